"""Weight-only quantization of expert matrices: pure functions, no calibration data.

Legend: W [N, K] (out features N, in features K; y = x @ W.T), G group size along K, T tokens.

Three forms of one matrix, each a dict of named tensors whose names/shapes/dtypes are known without
the weights (`storage_layout`, `compute_layout`), so the engine can lay them out in fixed-size records:
  storage   what the disk and RAM tiers hold (compact: int3 is 3 bits/param, ternary 1.6)
  resident  what a slot holds, ready to multiply (CPU: torch's int8/int4 kernel layouts; CUDA: dense bf16)
  dense     `dequantize`: fp32 [N, K], for tests and for the GPU path
`to_compute` turns storage into resident once per load; `qlinear` multiplies every token.

Formats: bf16 / fp32 (dense), int8 (symmetric per output channel, `_weight_int8pack_mm`), int4 / int3 /
int2 (asymmetric min/max per group of G along K with a searched clipping range), ternary (per-row
scale, codes in {-1, 0, 1}) and ternary-zNN (the same with NN% of each row's codes zero: a sparse cold tier
that the disk store entropy-codes with lzma). Each kind is one object in offload/formats/kinds.py; the
functions here check shapes and delegate to it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch

from offload.errors import OffloadError
from offload.formats.kinds import KINDS as KIND_OBJECTS, Int4Coded, Kind, Layout
from offload.formats.groupwise import CLIPS, range_inflation

KINDS = tuple(KIND_OBJECTS)
GROUPED = tuple(name for name, k in KIND_OBJECTS.items() if k.grouped)  # kinds that take a group size
GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 128  # "int4" means int4-g128: 4.25 bits/param, the usual size of published int4 MoE models
ADAPTIVE_THRESHOLD = 1.35  # choose_group_size: Gaussian weights score 1.25 at G=128 vs 32 at any size


class FormatError(OffloadError, ValueError):
    """A format string, or a matrix shape the format cannot hold."""


@dataclass(frozen=True)
class QFormat:
    kind: str            # one of KINDS
    group_size: int = 0  # int4/int3/int2: 32, 64, 128 (0 = adaptive, resolve per matrix); others: 0
    zeros: int = 0       # ternary: percent of each row's codes that are zero, 1..99 (0 = the error optimum)
    clip: str = "fast"   # int4/int3/int2 clip search: "fast" (2-4 candidate ranges), "search" (all of them) or
                         # "minmax" (none: each group's [min, max], the fastest conversion)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise FormatError(f"unknown weight format kind {self.kind!r}: expected one of {', '.join(KINDS)}")
        if self.zeros and (self.kind != "ternary" or not 0 < self.zeros < 100):
            raise FormatError(f"-z{self.zeros} (percent of zero codes, 1..99) applies to ternary only, got "
                              f"{self.kind}; use e.g. 'ternary-z80'")
        if self.clip not in CLIPS:
            raise FormatError(f"clip must be one of {', '.join(CLIPS)}, got {self.clip!r}")
        if self.clip != "fast" and self.kind not in GROUPED:
            raise FormatError(f"-{self.clip} (the clip search) applies to int4/int3/int2 only, got {self.kind}")
        if self.kind in GROUPED:
            if self.group_size not in (0, *GROUP_SIZES):
                raise FormatError(f"{self.kind} group size must be one of {GROUP_SIZES} (or 0 = adaptive), "
                                  f"got {self.group_size}")
        elif self.group_size != 0:
            raise FormatError(f"{self.kind} takes no group size (it is per output channel or dense), "
                              f"got {self.group_size}; group sizes apply to int4/int3/int2 only")

    @property
    def kind_object(self) -> Kind:
        """The object that carries this kind's layouts, quantizer, compute form and linear."""
        return KIND_OBJECTS[self.kind]

    @property
    def bits(self) -> int:
        """Bits per code (ternary: 2 here, log2(3) in principle; stored at 1.6, see storage_layout)."""
        return self.kind_object.bits

    @property
    def entropy_coded(self) -> bool:
        """Sparse codes (ternary-zNN): worth lzma in the disk store, whose decode they pay for on every load."""
        return self.zeros > 0

    @property
    def dense(self) -> bool:
        return self.kind_object.dense

    @property
    def adaptive(self) -> bool:
        return self.kind in GROUPED and self.group_size == 0

    def __str__(self) -> str:
        if self.zeros:
            return f"{self.kind}-z{self.zeros}"
        if self.kind not in GROUPED:
            return self.kind
        suffix = "" if self.clip == "fast" else f"-{self.clip}"
        return (f"{self.kind}-adaptive" if self.adaptive else f"{self.kind}-g{self.group_size}") + suffix


def parse_format(text: str) -> QFormat:
    """'bf16', 'fp32', 'int8', 'ternary', 'ternary-z80', 'int4' (= int4-g128), 'int4-g64', 'int3-adaptive', ...;
    int4/int3/int2 may end in '-search' (every clip candidate, `groupwise.SHRINKS`) or '-minmax' (none) instead
    of the fast default."""
    m = re.fullmatch(r"(bf16|fp32|int8|int4|int3|int2|ternary)(?:-(?:g(\d+)|(adaptive)|z([1-9]\d?)))?(-search|-minmax)?",
                     text.strip().lower())
    if m is None:
        raise FormatError(f"unknown weight format {text!r}: expected bf16, fp32, int8, ternary (or ternary-z80: 80% "
                          f"zeros), or int4/int3/int2 optionally followed by -g32, -g64, -g128 or -adaptive (e.g. "
                          f"'int4-g64'), then optionally -search or -minmax (e.g. 'int4-g64-search')")
    kind, group, adaptive, zeros, search = m.groups()
    if (group or adaptive or search) and kind not in GROUPED:
        raise FormatError(f"{text!r}: {kind} takes no group size or clip search; -gN, -adaptive, -search and -minmax apply "
                          f"to int4/int3/int2 only")
    if zeros:
        return QFormat(kind, zeros=int(zeros))
    clip = search[1:] if search else "fast"
    if adaptive:
        return QFormat(kind, 0, clip=clip)
    if kind in GROUPED:
        return QFormat(kind, int(group) if group else DEFAULT_GROUP_SIZE, clip=clip)
    return QFormat(kind)


def choose_group_size(w: torch.Tensor, bits: int, candidates=(128, 64, 32),
                      threshold: float = ADAPTIVE_THRESHOLD) -> int:
    """FineQuant-style adaptive granularity (Kim et al. 2023) from the weights alone: the largest candidate
    whose worst-case range inflation against the finest candidate (`groupwise.range_inflation`) stays
    <= threshold. Gaussian weights score 1.25 at G=128 (vs 32) at any size, so they keep G=128; outlier
    input features push it to 64 or 32. The score is a ratio of ranges and does not depend on `bits`
    (validated only). `w` may be stacked experts [E, N, K]: one group size for all, as records need.
    """
    if bits not in (2, 3, 4):
        raise FormatError(f"adaptive group size is for 2-4 bit formats, got {bits} bits")
    if not candidates or any(c not in GROUP_SIZES for c in candidates):
        raise FormatError(f"group size candidates must be drawn from {GROUP_SIZES}, got {tuple(candidates)}")
    K = w.shape[-1]
    usable = sorted((c for c in set(candidates) if K % c == 0), reverse=True)
    if not usable:
        raise FormatError(f"no candidate group size {tuple(candidates)} divides in_features K={K}; use int8")
    scores = range_inflation(w, usable)
    return next((g for g in usable if scores[g] <= threshold), usable[-1])


def resolve_format(fmt: QFormat, w: torch.Tensor) -> QFormat:
    """An adaptive format with its group size chosen for `w`; any other format unchanged."""
    return replace(fmt, group_size=choose_group_size(w, fmt.bits)) if fmt.adaptive else fmt


def _check(fmt: QFormat, shape) -> tuple[int, int]:
    if len(shape) != 2:
        raise FormatError(f"expected one matrix [out_features, in_features], got shape {tuple(shape)}")
    N, K = (int(d) for d in shape)
    if fmt.adaptive:
        raise FormatError(f"{fmt} has no group size yet: call resolve_format(fmt, w) (or choose_group_size) first")
    if isinstance(fmt.kind_object, Int4Coded):
        G = fmt.group_size or 32
        if N % 16 or K % G:
            raise FormatError(f"{fmt} needs out_features divisible by 16 and in_features by {G} (torch's CPU int4 "
                              f"kernel), got [{N}, {K}]; pick another group size, or int8/bf16 for this matrix")
    return N, K


# ---- the operations, each delegated to the format's kind object (offload/formats/kinds.py) --------------

def storage_layout(fmt: QFormat, shape) -> Layout:
    """Names, shapes and dtypes of what `quantize` returns, in record order."""
    N, K = _check(fmt, shape)
    return fmt.kind_object.storage_layout(fmt, N, K)


def compute_layout(fmt: QFormat, shape, device_type: str = "cpu") -> Layout:
    """Names, shapes and dtypes of the resident form on `device_type` ('cpu', 'cuda', ...)."""
    N, K = _check(fmt, shape)
    return fmt.kind_object.compute_layout(fmt, N, K, device_type)


def quantize(w: torch.Tensor, fmt: QFormat) -> dict[str, torch.Tensor]:
    """W [N, K] (any float dtype) -> the storage form, laid out as `storage_layout(fmt, w.shape)`."""
    _check(fmt, w.shape)
    return fmt.kind_object.quantize(fmt, w.detach())


def dequantize(parts: dict[str, torch.Tensor], fmt: QFormat, shape) -> torch.Tensor:
    """Storage form -> fp32 W [N, K] on the parts' device (the exact values the kernels multiply with)."""
    N, K = _check(fmt, shape)
    return fmt.kind_object.dequantize(fmt, parts, N, K)


def unpack_codes(parts: dict[str, torch.Tensor], fmt: QFormat, shape) -> torch.Tensor:
    """The integer codes [N, K] of a quantized matrix: int8 values, kernel q in 0..15 for int4/3/2, or t in -1..1."""
    N, K = _check(fmt, shape)
    return fmt.kind_object.codes(fmt, parts, N, K)


def to_compute(parts: dict[str, torch.Tensor], fmt: QFormat, shape, device: torch.device | str = "cpu",
               out: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Storage form -> resident form on `device`, written into `out` (e.g. slot views) when given.

    Once per load, never per token. CPU: int4 and int8 are a copy; int3/int2/ternary expand through a
    table lookup (about 1 ms for 1024x3584). Other devices: every quantized format is dequantized to
    dense bf16 on the device (uses a transient fp32 [N, K]). Never aliases `parts`.
    """
    N, K = _check(fmt, shape)
    device = torch.device(device)
    if out is None:
        out = {name: torch.empty(s, dtype=dt, device=device) for name, s, dt in compute_layout(fmt, shape, device.type)}
    fmt.kind_object.to_compute(fmt, parts, N, K, device, out)
    return out


def qlinear(x: torch.Tensor, resident: dict[str, torch.Tensor], fmt: QFormat, shape) -> torch.Tensor:
    """y = x @ W.T for x [..., K] -> [..., N] in x.dtype. CPU kernels take bf16 activations (fp32 is 10-50x slower)."""
    N, K = int(shape[0]), int(shape[1])
    flat = x.dim() == 2  # a decode step's [1, K]: no reshape, and no conversions that would be no-ops (they cost)
    y = fmt.kind_object.linear(x if flat else x.reshape(-1, K), resident, N, K)
    if flat and y.dtype == x.dtype:
        return y
    return y.to(x.dtype).view(*x.shape[:-1], N)


# ---- sizes ----------------------------------------------------------------------------------------

def bits_per_param(parts: dict[str, torch.Tensor], shape, lz4_level: int | None = None) -> float:
    """Stored bits per weight, scales included; with `lz4_level`, the measured lz4.frame-compressed size."""
    nbytes = 0
    for t in parts.values():
        if lz4_level is None:
            nbytes += t.numel() * t.element_size()
        else:
            import lz4.frame
            raw = t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
            nbytes += len(lz4.frame.compress(raw, compression_level=lz4_level))
    return 8 * nbytes / (int(shape[0]) * int(shape[1]))


def entropy_bits(values: torch.Tensor) -> float:
    """Empirical Shannon entropy of integer codes, bits per code: the floor for any code-by-code coder."""
    _, counts = torch.unique(values, return_counts=True)
    p = counts.double() / values.numel()
    return float(-(p * p.log2()).sum())
