"""Sparse ternary at a bits budget (`ternary-b1.0`): each expert matrix gets its own ternary-zNN, chosen so the
store's bits/param stay within the budget while the calibrated output error is least.

A fixed share of zeros (ternary-z80) spends the same bits on every matrix, though matrices differ in how much
output error their zeros cost: an expert few tokens reach, or a matrix whose inputs are small, can take more.
For every matrix and every share in ZEROS, the conversion's own encoder (GPTQ with the joint support, or the
weights alone where calibration is too thin) codes it once; its cost is tr((W - Q) H (W - Q)^T) times the
tokens routed to the expert (at least MIN_TOKENS: the output error summed over the calibration text, which
an unseen text may route differently), its size the lzma-coded bytes of its storage parts. A Lagrangian
sweep, then greedy upgrades into what is left, picks one share per matrix with the summed size within the
budget (less the index and alignment padding). Decode is ternary's whatever the share, and each record's
kind names its two shares ("ternary-z85/ternary-z70"), so the store reads back exactly. The measuring and
the cached choice are the store's (offload/store/allocation.py); this module holds the spelling and the
allocation.
"""
from __future__ import annotations

import heapq
import re
from dataclasses import dataclass

import numpy as np

from offload.errors import OffloadError
from offload.formats.quant import QFormat

Key = tuple[int, int]  # (layer, expert)

ZEROS = (50, 60, 70, 75, 80, 85, 90, 95, 98)  # percent of zero codes a matrix may take
LOWEST, HIGHEST = 0.4, 1.5  # budgets the candidates can meet on any matrix shape of 128+ inputs
SPELLING = re.compile(r"ternary-b(\d+(?:\.\d+)?)")


@dataclass(frozen=True)
class BitsBudget:
    bits: float  # stored bits per expert parameter, index and padding included

    @staticmethod
    def of(spelling) -> BitsBudget | None:
        """'ternary-b1.0' -> its budget; any other bits option -> None. Out of range: one line naming the fix."""
        if not isinstance(spelling, str) or not spelling.strip().lower().startswith("ternary-b"):
            return None
        m = SPELLING.fullmatch(spelling.strip().lower())
        if m is None or not LOWEST <= float(m.group(1)) <= HIGHEST:
            raise OffloadError(f"{spelling!r}: a sparse ternary bits budget is ternary-bX with X bits/param from "
                               f"{LOWEST} to {HIGHEST}, e.g. 'ternary-b1.0'")
        return BitsBudget(float(m.group(1)))

    @property
    def fmt(self) -> QFormat:
        """The format the record codec sizes records and slots by: every ternary-zNN has its layout."""
        return QFormat("ternary", zeros=ZEROS[0])

    def __str__(self) -> str:
        return f"ternary-b{self.bits}"


@dataclass
class Costs:
    """Per expert matrix and candidate share: calibrated output error and lzma-coded bytes."""

    error: dict[tuple[Key, str], list[float]]
    nbytes: dict[tuple[Key, str], list[int]]


def allocate(costs: Costs, target: int) -> dict[tuple[Key, str], int]:
    """One candidate index per matrix minimising the summed error with the summed bytes <= target: the
    cheapest-error choice at the Lagrange multiplier that fits, then the best error-per-byte upgrades that still
    do. Vectorised and heap-ordered so that a model of ~24k expert matrices (Qwen3-235B) allocates in seconds."""
    mats = list(costs.error)
    error = np.array([costs.error[x] for x in mats], dtype=np.float64)   # [M, len(ZEROS)]
    nbytes = np.array([costs.nbytes[x] for x in mats], dtype=np.int64)
    rows = np.arange(len(mats))

    def pick(lam: float) -> np.ndarray:
        return np.argmin(error + lam * nbytes, axis=1)  # the first least, as min() over range(len(ZEROS))

    def size(choice: np.ndarray) -> int:
        return int(nbytes[rows, choice].sum())

    smallest = int(nbytes.min(axis=1).sum())
    if smallest > target:
        raise OffloadError(f"even {ZEROS[-1]}% zeros everywhere takes {smallest} bytes, over the budget's "
                           f"{target}; give a larger budget (ternary-bX)")
    lo, hi = 0.0, 1.0
    while size(pick(hi)) > target:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if size(pick(mid)) <= target else (mid, hi)
    choice = [int(j) for j in pick(hi)]
    left = target - size(np.array(choice))
    return {x: j for x, j in zip(mats, _upgrade(error, nbytes, choice, left))}


def _upgrade(error: np.ndarray, nbytes: np.ndarray, choice: list[int], left: int) -> list[int]:
    """Greedy upgrades into the `left` bytes: each time, the candidate of most error saved per byte that fits
    (ties: the first matrix, then the first share). A lazy heap of every matrix's candidates from its current
    share; an entry is stale once its matrix moved, and one that does not fit is set aside until bytes free up."""
    heap: list = []

    def push(i: int) -> None:
        j = choice[i]
        for k in range(error.shape[1]):
            gain, extra = float(error[i, j] - error[i, k]), int(nbytes[i, k] - nbytes[i, j])
            if gain > 0:
                heapq.heappush(heap, (-gain / max(extra, 1), i, k, j, extra, gain))

    for i in range(len(choice)):
        push(i)
    waiting: list = []
    while heap:
        entry = heapq.heappop(heap)
        _, i, k, j, extra, _ = entry
        if choice[i] != j:
            continue
        if extra > left:
            waiting.append(entry)
            continue
        choice[i], left = k, left - extra
        push(i)
        if extra < 0:  # bytes freed: what did not fit may now
            for e in waiting:
                heapq.heappush(heap, e)
            waiting = []
    return choice
