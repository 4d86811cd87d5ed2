"""GPTQ (Frantar et al. 2022): quantize one matrix column by column, pushing each column's rounding error
onto the columns not yet quantized, weighted by the inverse Hessian of the layer's output error.

Legend: W [N, K] (y = x @ W.T), X [n, K] the inputs the matrix saw, H = 2 X^T X / n [K, K].
Minimises ||X W^T - X Q^T|| rather than ||W - Q||: the error goes where the inputs do not look. Columns go
in order (groups stay contiguous, as the kernels need), in blocks of BLOCK with lazy updates of the rest;
the grid of a group of G columns (scale, zero; the weight-only clip search on the columns as updated so
far) is chosen when GPTQ reaches its first column. Ternary starts from its per-row scale (TWN's optimum on
W) and rounds to {-1, 0, 1}; after the sweep each row's scale is refitted by least squares on H given its
codes, and the sweep runs again from those scales (SCALE_PASSES). Sparse ternary (ternary-zNN) chooses its support inside the sweep, as SparseGPT
(Frantar & Alistarh 2023) chooses its mask: at each block of MASK_BLOCK columns, from the weights as
updated so far, each row keeps the entries whose zeroing would cost the most (OBS saliency, the error
divided by the inverse Hessian's diagonal), its share of the row's nonzeros, so every row ends with
exactly the requested zeros. Where the damped H is not positive definite, `gptq` returns None and the
caller quantizes from the weights alone.
"""
from __future__ import annotations

import torch

from offload.formats.groupwise import quantize_groups
from offload.formats.kinds import Grouped, Parts, Ternary
from offload.formats.quant import QFormat
from offload.formats.ternary import ternarize

BLOCK = 128     # columns per lazy batch update
DAMPING = 0.01  # added to H's diagonal, times its mean: the paper's default
MASK_BLOCK = 32  # sparse ternary: columns whose support is chosen at once (divides BLOCK); lower loss than 128 or 16
# sparse ternary: 10x QMoE's 0.1. The demo's experts see 200-700 tokens for K = 256-288, so H is poorly
# estimated; held-out perplexity at z80: +36% at 1.0, +47% at 0.1 (docs/benchmarks/sparse-ternary.md)
SPARSE_DAMPING = 1.0
# ternary: sweeps, each followed by the scale refit. Demo z80, calibration loss against one sweep without the refit:
# 1 sweep 0.33, 2 sweeps 0.27, 3 sweeps 0.27; held-out perplexity +35.6% without, +4.1% and +2.6% with 1 and 2 sweeps
SCALE_PASSES = 2


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

    def refit(self, w: torch.Tensor, H: torch.Tensor) -> None:
        """Each row's scale to the least-squares optimum of tr((w - s t) H (w - s t)^T) given its codes t,
        s = w H t^T / t H t^T: the weights' TWN scale ignores that error feedback moved the codes. A row whose
        optimum is negative flips its codes' signs instead (the same error, a scale the format can hold)."""
        t = self.t.float()
        num, den = ((w @ H) * t).sum(1), ((t @ H) * t).sum(1)
        self.t.mul_(torch.where(num < 0, -1, 1).to(torch.int8)[:, None])
        self.scale = torch.where(den > 0, num.abs() / den.clamp(min=1e-30), self.scale).bfloat16().float()

    def parts(self) -> Parts:
        return self.kind.pack(self.t, self.scale)


class SparseTernaryGrid(TernaryGrid):
    """ternary-zNN, support chosen in the sweep: per row, per block of MASK_BLOCK columns, the entries with
    the largest drop in output error between coding them 0 and +-scale, (w^2 - (|w| - s)^2) / d^2 with d the
    sweep's sqrt of the inverse Hessian's diagonal. The row's keep count is split over the blocks by
    rounding its running share, so each row has exactly round((1 - zeros) * K) nonzeros."""

    def __init__(self, kind: Ternary, w: torch.Tensor, zeros: float, d: torch.Tensor) -> None:
        self.kind, self.K = kind, w.shape[1]
        self.keep = min(self.K, max(1, round((1 - zeros) * self.K)))
        _, scale = ternarize(w, zeros)  # TWN's optimum scale for this support size, on the weights
        self.scale = scale.bfloat16().float()
        self.d2 = d.square()
        self.t = torch.empty(w.shape, dtype=torch.int8)

    def begin(self, j: int, cols: torch.Tensor) -> None:
        if j % MASK_BLOCK:
            return
        m = min(MASK_BLOCK, cols.shape[1])
        n = round(self.keep * (j + m) / self.K) - round(self.keep * j / self.K)
        s = self.scale[:, None]
        gain = (2 * cols[:, :m].abs() - s) * s / self.d2[j:j + m]           # [N, m]
        self.mask, self.j0 = self._keep(gain, n), j

    def _keep(self, gain: torch.Tensor, n: int) -> torch.Tensor:
        """The block's support: each row's n highest gains."""
        mask = torch.zeros(gain.shape, dtype=torch.bool)
        return mask.scatter_(1, gain.topk(n, dim=1).indices, True)

    def round(self, j: int, w: torch.Tensor) -> torch.Tensor:
        t = torch.where(w >= 0, 1.0, -1.0) * self.mask[:, j - self.j0]     # kept entries are never 0
        self.t[:, j] = t.to(torch.int8)
        return t * self.scale


class MatrixSupportGrid(SparseTernaryGrid):
    """ternary-zNN with each block's nonzeros chosen over the whole matrix instead of per row: the gains are
    drops in one summed output error, so rows that matter more keep more. The matrix has exactly
    N * round((1 - zeros) * K) nonzeros, its rows not each their share."""

    def _keep(self, gain: torch.Tensor, n: int) -> torch.Tensor:
        mask = torch.zeros(gain.numel(), dtype=torch.bool)
        mask[gain.flatten().topk(n * len(gain)).indices] = True
        return mask.view(gain.shape)


class FixedSupportGrid(SparseTernaryGrid):
    """ternary-zNN with the support thresholded from the weights first (`ternarize`), GPTQ choosing only the
    signs: the baseline the joint choice is measured against."""

    def __init__(self, kind: Ternary, w: torch.Tensor, zeros: float, d: torch.Tensor) -> None:
        super().__init__(kind, w, zeros, d)
        self.support = ternarize(w, zeros)[0] != 0

    def begin(self, j: int, cols: torch.Tensor) -> None:
        self.mask, self.j0 = self.support, 0


# how ternary-zNN picks its zeros
SUPPORTS = {"joint": SparseTernaryGrid, "matrix": MatrixSupportGrid, "fixed": FixedSupportGrid}


def supports(fmt: QFormat) -> bool:
    """Whether GPTQ can code `fmt`: the grouped kinds at a fixed group size and every ternary."""
    kind = fmt.kind_object
    return (isinstance(kind, Grouped) and fmt.group_size > 0) or isinstance(kind, Ternary)


def _grid(fmt: QFormat, w: torch.Tensor, d: torch.Tensor, support: str):
    kind = fmt.kind_object
    if isinstance(kind, Ternary):
        return SUPPORTS[support](kind, w, fmt.zeros / 100, d) if fmt.zeros else TernaryGrid(kind, w)
    return GroupGrid(kind, fmt, *w.shape)


def inverse_hessian_factor(H: torch.Tensor, damping: float = DAMPING) -> torch.Tensor | None:
    """Upper Cholesky factor of (H + damping * mean(diag H) * I)^-1, or None where H is not positive definite."""
    H = H.double()
    H = H + torch.eye(len(H), dtype=H.dtype) * (damping * H.diagonal().mean())
    L, info = torch.linalg.cholesky_ex(H)
    if info != 0:
        return None
    U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
    return U.float() if info == 0 else None


def gptq(w: torch.Tensor, H: torch.Tensor, fmt: QFormat, damping: float | None = None,
         support: str = "joint", passes: int = SCALE_PASSES) -> Parts | None:
    """W [N, K] fp32 and its inputs' H [K, K] -> the storage form of `fmt` (as `quantize` lays it out), or None
    where the damped H has no Cholesky factor. `damping` None: SPARSE_DAMPING for ternary-zNN, else DAMPING;
    `support`: how ternary-zNN picks its zeros (SUPPORTS); ternary: `passes` sweeps, each after the first
    from the scales the one before refitted (`TernaryGrid.refit`), which the last refits too."""
    if damping is None:
        damping = SPARSE_DAMPING if fmt.zeros else DAMPING
    W = w.float().clone()
    H = H.float().clone()
    dead = H.diagonal() == 0  # inputs that are always zero: any weight works, zero is the cheapest
    H[dead, dead] = 1
    W[:, dead] = 0
    U = inverse_hessian_factor(H, damping)
    if U is None:
        return None
    grid = _grid(fmt, W, U.diagonal(), support)
    if not isinstance(grid, TernaryGrid):
        _sweep(W, U, grid)
        return grid.parts()
    for _ in range(passes):
        _sweep(W.clone(), U, grid)
        grid.refit(W, H)
    return grid.parts()


def _sweep(W: torch.Tensor, U: torch.Tensor, grid) -> None:
    """GPTQ's pass over the columns of W (updated in place), each coded by `grid`."""
    N, K = W.shape
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
