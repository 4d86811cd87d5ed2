"""Asymmetric group-wise quantization along K, and the range statistic behind adaptive group sizes.

Legend: W [N, K] (out features N, in features K), G group size, b bits. A group of G consecutive
weights of one row shares a scale and a zero: w ~ (code - 2^(b-1)) * scale + zero, code in 0..2^b-1,
which is the int4 kernel's w = (q - 8) * scale + zero for q = code + 8 - 2^(b-1).
"""
from __future__ import annotations

import torch

from offload.formats import compiled

# Clipping search (weights only, no calibration): shrink each group's [min, max] around its midpoint by
# these factors and keep the one with the least squared error. Gaussian 1024x3584, relative error
# min/max -> searched: int4-g128 0.100 -> 0.095, int3-g128 0.214 -> 0.184, int2-g128 0.501 -> 0.345.
SHRINKS = {4: (1.0, 0.95, 0.9, 0.85), 3: (1.0, 0.95, 0.9, 0.85, 0.8, 0.75),
           2: (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55)}
# clip="fast": per (bits, G), the subset of those factors, 1.0 included (weights already on a grid stay exact),
# whose search comes closest to the full one (exhaustive over subsets on Gaussian, Student-t(4) and the demo's
# experts): relative weight error at most +0.44% for int4, +0.82% int3, +0.65% int2, for half the candidates
# or fewer (docs/benchmarks/conversion.md). The search's cost is linear in its candidates.
FAST = {(4, 32): (1.0, 0.95), (4, 64): (1.0, 0.95), (4, 128): (1.0, 0.95, 0.9),
        (3, 32): (1.0, 0.9, 0.85), (3, 64): (1.0, 0.9, 0.8), (3, 128): (1.0, 0.85, 0.75),
        (2, 32): (1.0, 0.8, 0.7, 0.6), (2, 64): (1.0, 0.75, 0.65, 0.55), (2, 128): (1.0, 0.75, 0.65, 0.55)}
CLIPS = ("fast", "search", "minmax")  # minmax: no search, each group's own [min, max] (the fastest)
# 2^23: for an integer c in 0..2^23, the fp32 2^23 + c has c in its low mantissa bits, so an int32 view narrowed
# to uint8 yields c (~0.1 ns per code, against ~0.9 for torch's float -> uint8 conversion).
MAGIC = float(1 << 23)
BLOCK = 1 << 20  # weights per block of rows: its grids, choice and codes are computed once per block
CHUNK = 1 << 17  # candidate weights (rows x candidates) per pass of the search: 512 KB buffers stay in L2


def shrinks(bits: int, G: int, clip: str = "search") -> tuple[float, ...]:
    """The clip factors `clip` ("fast", "search" or "minmax") tries for `bits`-bit codes in groups of G."""
    return {"fast": FAST[bits, G], "search": SHRINKS[bits], "minmax": (1.0,)}[clip]


def _grid(hi: torch.Tensor, lo: torch.Tensor, share: torch.Tensor, top: int, mid: int):
    """(scale, zero), rounded to bf16 as stored, of the range [lo, hi] shrunk about its middle to 2 * `share` of it."""
    half = (hi - lo) * share
    scale = (2 * half / top).clamp(min=1e-20).bfloat16().float()
    return scale, ((hi + lo) / 2 - half + mid * scale).bfloat16().float()


def _errors(g: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, top: int, mid: int, c: torch.Tensor
            ) -> torch.Tensor:
    """Squared error of each candidate grid (scale, zero [S, n, K/G, 1]) on each group of `g` [n, K/G, G] ->
    [S, n, K/G, 1]: every candidate of a few rows in one pass of each operation, in place in the flat buffer `c`."""
    S, (n, KG, G) = scale.shape[0], g.shape
    err = torch.empty_like(scale)
    rows = max(1, CHUNK // (S * KG * G))
    for r in range(0, n, rows):
        x, s, z = g[r:r + rows], scale[:, r:r + rows], zero[:, r:r + rows]
        q = torch.sub(x, z, out=c[:S * x.numel()].view(S, *x.shape)).div_(s).round_().clamp_(-mid, top - mid)
        err[:, r:r + rows] = q.mul_(s).add_(z).sub_(x).square_().sum(-1, keepdim=True)  # q = codes - mid, exactly
    return err


def _search(g: torch.Tensor, halves: torch.Tensor, top: torch.Tensor, mid: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """One block g [n, K/G, G] -> (codes uint8 [n, K/G, G], (scale, zero) bf16 [n, K/G, 2]): the eager loop's
    search and codes in one function for torch.compile, which fuses them into a pass or two over the block.
    The clip factors and the code range are tensors, so formats share compiled code (one build per shape)."""
    g = g.float()
    hi, lo = g.amax(-1, keepdim=True), g.amin(-1, keepdim=True)

    def error(half: torch.Tensor) -> torch.Tensor:
        scale, zero = _grid(hi, lo, half, top, mid)
        q = ((g - zero) / scale).round().clamp(-mid, top - mid)
        return (q * scale + zero - g).square().sum(-1, keepdim=True)

    best = halves[0].expand_as(hi)
    if halves.shape[0] > 1:
        least = error(halves[0])
        for i in range(1, halves.shape[0]):  # the first candidate of least error wins
            err = error(halves[i])
            best, least = torch.where(err < least, halves[i], best), torch.minimum(err, least)
    scale, zero = _grid(hi, lo, best, top, mid)
    codes = ((g - zero) / scale).round().add(mid).clamp(torch.zeros_like(top), top).to(torch.uint8)
    return codes, torch.cat([scale, zero], -1).bfloat16()


def _block_rows(N: int, K: int) -> int:
    """Rows per block: BLOCK // K, lowered to a divisor of N where one is within 2x (a single compiled shape)."""
    rows = max(1, min(N, BLOCK // K))
    return next((d for d in range(rows, rows // 2, -1) if N % d == 0), rows)


def quantize_groups(w: torch.Tensor, bits: int, G: int, factors: tuple[float, ...] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] (any float dtype, any strides) -> (codes uint8 [N, K] in 0..2^bits-1, qsz bf16 [K/G, N, 2] =
    (scale, zero) per group), trying the clip `factors` (default: every one in SHRINKS).

    Codes are computed against the bf16-rounded scale and zero, i.e. against what is stored; the first candidate
    with the least error wins. A block of rows at a time: on a large CPU matrix by the compiled `_search`;
    otherwise (and for a last, shorter block) by the eager loop, which converts rows to fp32 into one reused
    buffer and tries every candidate range on a few rows at a time (`_errors`). Both give the same bytes."""
    N, K = w.shape
    top, mid = (1 << bits) - 1, 1 << (bits - 1)
    halves = [s / 2 for s in (factors or SHRINKS[bits])]
    S = len(halves)
    codes = torch.empty(N, K, dtype=torch.uint8, device=w.device)
    sz = torch.empty(N, K // G, 2, dtype=torch.bfloat16, device=w.device)
    rows = _block_rows(N, K)
    search = compiled.for_matrix(_search, w)
    if search is not None:
        args = (torch.tensor(halves), torch.tensor(float(top)), torch.tensor(float(mid)))
        with compiled.recompiles():
            for r in range(0, N - N % rows, rows):
                c, s = search(w[r:r + rows].reshape(rows, K // G, G), *args)
                codes[r:r + rows].view(c.shape).copy_(c)
                sz[r:r + rows] = s
        done = N - N % rows
    else:
        done = 0
    stacked = torch.tensor(halves, device=w.device).view(-1, 1, 1, 1)          # [S, 1, 1, 1]
    R = min(rows, N - done)
    searched = S * max(1, CHUNK // (S * K))  # rows x candidates of one pass of `_errors`
    x, c = torch.empty(R * K, device=w.device), torch.empty(max(R, searched) * K, device=w.device)
    for r in range(done, N, rows):
        n = min(rows, N - r)
        g = x[:n * K].view(n, K).copy_(w[r:r + n]).view(n, K // G, G)           # [n, K/G, G]
        hi, lo = g.amax(-1, keepdim=True), g.amin(-1, keepdim=True)
        half = torch.full_like(hi, halves[0])
        if S > 1:
            err = _errors(g, *_grid(hi, lo, stacked, top, mid), top, mid, c)    # [S, n, K/G, 1]
            least = err[0]
            for i in range(1, S):  # the first candidate of least error wins
                half.masked_fill_(err[i] < least, halves[i])
                least = torch.minimum(least, err[i])
        scale, zero = _grid(hi, lo, half, top, mid)                             # the winner's, recomputed
        q = torch.sub(g, zero, out=c[:g.numel()].view(g.shape)).div_(scale).round_().add_(MAGIC + mid)
        codes[r:r + n].view(g.shape).copy_(q.clamp_(MAGIC, MAGIC + top).view(torch.int32))  # low byte = the code
        sz[r:r + n] = torch.cat([scale, zero], -1)
    return codes, sz.transpose(0, 1).contiguous()


def range_inflation(w: torch.Tensor, sizes: list[int]) -> dict[int, float]:
    """Worst-case range inflation of each group size against the finest one (FineQuant-style, weights only).

    Quantization noise per weight grows with its group's max-min range. For a group size G, every
    finest-size sub-group is charged its parent group's range instead of its own; the inflation of one
    block of G input features is sqrt(sum parent range^2 / sum own range^2) over all rows, and the score
    of G is its worst block. Outlier input features (LLM.int8's observation) inflate their block's range
    in every row, so even one such column shows. Measured against G=32 at 1024x3584 (G=128 / G=64):
    Gaussian 1.25 / 1.13 at any matrix size, Laplace 1.40 / 1.20, Student-t(4) 1.57 / 1.27, one input
    feature scaled 20x 1.94 / 1.40, 0.2% of features scaled 8x 1.71 / 1.34.
    `w` is [..., K] (stacked experts are fine); every size must divide K and the finest every other.
    """
    K = w.shape[-1]
    f = min(sizes)
    fine = w.detach().reshape(-1, K // f, f).float()
    hi, lo = fine.amax(dim=-1), fine.amin(dim=-1)                               # [R, K/f]
    own = (hi - lo).square()
    scores = {}
    for g in sizes:
        k = g // f
        parent = hi.view(-1, K // g, k).amax(-1) - lo.view(-1, K // g, k).amin(-1)    # [R, K/g]
        charged = parent.square().sum(0) * k                                    # [K/g]
        mine = own.view(-1, K // g, k).sum((0, 2)).clamp(min=torch.finfo(torch.float32).tiny)
        scores[g] = float((charged / mine).sqrt().max())
    return scores
