"""GPTQ (Frantar et al. 2022): quantize one matrix column by column, pushing each column's rounding error
onto the columns not yet quantized, weighted by the inverse Hessian of the layer's output error.

Legend: W [N, K] (y = x @ W.T), X [n, K] the inputs the matrix saw, H = 2 X^T X / n [K, K].
Minimises ||X W^T - X Q^T|| rather than ||W - Q||: the error goes where the inputs do not look. Columns go
in order (groups stay contiguous, as the kernels need), in blocks of BLOCK with lazy updates of the rest;
the grid of a group of G columns (scale, zero; the weight-only clip search on the columns as updated so
far) is chosen when GPTQ reaches its first column. Ternary keeps its per-row scale (TWN's optimum on W)
and rounds to {-1, 0, 1}. Where the damped H is not positive definite, `gptq` returns None and the caller
quantizes from the weights alone.
"""
from __future__ import annotations

import torch

from offload.formats.groupwise import quantize_groups
from offload.formats.kinds import Grouped, Parts, Ternary
from offload.formats.quant import QFormat
from offload.formats.ternary import ternarize

BLOCK = 128     # columns per lazy batch update
DAMPING = 0.01  # added to H's diagonal, times its mean: the paper's default


class GroupGrid:
    """Asymmetric min/max grid per group of G columns, 2^bits levels (int4, int3, int2)."""

    def __init__(self, kind: Grouped, fmt: QFormat, N: int, K: int) -> None:
        self.kind, self.G, self.bits = kind, fmt.group_size, kind.bits
        self.top, self.mid = (1 << self.bits) - 1, 1 << (self.bits - 1)
        self.codes = torch.empty(N, K, dtype=torch.uint8)
        self.qsz = torch.empty(K // self.G, N, 2, dtype=torch.bfloat16)

    def begin(self, j: int, cols: torch.Tensor) -> None:
        """Column j starts a group when j % G == 0: choose its grid from `cols` (its columns, as updated)."""
        if j % self.G == 0:
            _, qsz = quantize_groups(cols[:, :self.G], self.bits, self.G)
            self.qsz[j // self.G] = qsz[0]
            self.scale, self.zero = qsz[0].float().unbind(-1)

    def round(self, j: int, w: torch.Tensor) -> torch.Tensor:
        q = ((w - self.zero) / self.scale).round_().add_(self.mid).clamp_(0, self.top)
        self.codes[:, j] = q.to(torch.uint8)
        return (q - self.mid) * self.scale + self.zero

    def parts(self) -> Parts:
        return {**self.kind.pack(self.codes), "qsz": self.qsz}


class TernaryGrid:
    """Per-row scale fixed from the weights (TWN's optimum), codes in {-1, 0, 1}."""

    def __init__(self, kind: Ternary, w: torch.Tensor) -> None:
        self.kind = kind
        _, self.scale = ternarize(w)
        self.scale = self.scale.bfloat16().float()  # rounded as stored
        self.t = torch.empty(w.shape, dtype=torch.int8)

    def begin(self, j: int, cols: torch.Tensor) -> None:
        pass

    def round(self, j: int, w: torch.Tensor) -> torch.Tensor:
        t = (w / self.scale.clamp(min=1e-20)).round_().clamp_(-1, 1)
        self.t[:, j] = t.to(torch.int8)
        return t * self.scale

    def parts(self) -> Parts:
        return self.kind.pack(self.t, self.scale)


def supports(fmt: QFormat) -> bool:
    """Whether GPTQ can code `fmt`: the grouped kinds and ternary at its error optimum (ternary-zNN fixes
    each row's zeros, which rounding with error feedback does not keep)."""
    kind = fmt.kind_object
    return (isinstance(kind, Grouped) and fmt.group_size > 0) or (isinstance(kind, Ternary) and not fmt.zeros)


def _grid(fmt: QFormat, w: torch.Tensor):
    kind = fmt.kind_object
    return TernaryGrid(kind, w) if isinstance(kind, Ternary) else GroupGrid(kind, fmt, *w.shape)


def inverse_hessian_factor(H: torch.Tensor, damping: float = DAMPING) -> torch.Tensor | None:
    """Upper Cholesky factor of (H + damping * mean(diag H) * I)^-1, or None where H is not positive definite."""
    H = H.double()
    H = H + torch.eye(len(H), dtype=H.dtype) * (damping * H.diagonal().mean())
    L, info = torch.linalg.cholesky_ex(H)
    if info != 0:
        return None
    U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
    return U.float() if info == 0 else None


def gptq(w: torch.Tensor, H: torch.Tensor, fmt: QFormat, damping: float = DAMPING) -> Parts | None:
    """W [N, K] fp32 and its inputs' H [K, K] -> the storage form of `fmt` (as `quantize` lays it out), or None
    where the damped H has no Cholesky factor."""
    N, K = w.shape
    W = w.float().clone()
    H = H.float().clone()
    dead = H.diagonal() == 0  # inputs that are always zero: any weight works, zero is the cheapest
    H[dead, dead] = 1
    W[:, dead] = 0
    U = inverse_hessian_factor(H, damping)
    if U is None:
        return None
    grid = _grid(fmt, W)
    for i1 in range(0, K, BLOCK):
        i2 = min(i1 + BLOCK, K)
        W1, U1 = W[:, i1:i2], U[i1:i2, i1:i2]
        err = torch.empty(N, i2 - i1)
        for i in range(i2 - i1):
            grid.begin(i1 + i, W1[:, i:])
            col = W1[:, i]
            e = (col - grid.round(i1 + i, col)) / U1[i, i]
            W1[:, i:].sub_(e[:, None] * U1[i, i:][None, :])
            err[:, i] = e
        W[:, i2:].sub_(err @ U[i1:i2, i2:])
    return grid.parts()
