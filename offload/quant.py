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
scale, codes in {-1, 0, 1}, see offload/ternary.py) and ternary-zNN (the same with NN% of each row's codes
zero: a sparse cold tier that the disk store entropy-codes with lzma). int3, int2 and the ternaries run on
the same CPU int4 kernel (`_weight_int4pack_mm_for_cpu`, w = (q - 8) * scale + zero): their codes are a
subset of 0..15.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from offload import packing
from offload.errors import OffloadError
from offload.groupwise import quantize_groups, range_inflation
from offload.ternary import ternarize

Layout = list[tuple[str, tuple[int, ...], torch.dtype]]

KINDS = ("bf16", "fp32", "int8", "int4", "int3", "int2", "ternary")
GROUPED = {"int4": 4, "int3": 3, "int2": 2}  # kind -> bits
GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 128  # "int4" means int4-g128: 4.25 bits/param, the size background.md plans with
ADAPTIVE_THRESHOLD = 1.35  # choose_group_size: Gaussian weights score 1.25 at G=128 vs 32 at any size


class FormatError(OffloadError, ValueError):
    """A format string, or a matrix shape the format cannot hold."""


@dataclass(frozen=True)
class QFormat:
    kind: str            # one of KINDS
    group_size: int = 0  # int4/int3/int2: 32, 64, 128 (0 = adaptive, resolve per matrix); others: 0
    zeros: int = 0       # ternary: percent of each row's codes that are zero, 1..99 (0 = the error optimum)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise FormatError(f"unknown weight format kind {self.kind!r}: expected one of {', '.join(KINDS)}")
        if self.zeros and (self.kind != "ternary" or not 0 < self.zeros < 100):
            raise FormatError(f"-z{self.zeros} (percent of zero codes, 1..99) applies to ternary only, got "
                              f"{self.kind}; use e.g. 'ternary-z80'")
        if self.kind in GROUPED:
            if self.group_size not in (0, *GROUP_SIZES):
                raise FormatError(f"{self.kind} group size must be one of {GROUP_SIZES} (or 0 = adaptive), "
                                  f"got {self.group_size}")
        elif self.group_size != 0:
            raise FormatError(f"{self.kind} takes no group size (it is per output channel or dense), "
                              f"got {self.group_size}; group sizes apply to int4/int3/int2 only")

    @property
    def bits(self) -> int:
        """Bits per code (ternary: 2 here, log2(3) in principle; stored at 1.6, see storage_layout)."""
        return {"bf16": 16, "fp32": 32, "int8": 8, "ternary": 2}.get(self.kind) or GROUPED[self.kind]

    @property
    def entropy_coded(self) -> bool:
        """Sparse codes (ternary-zNN): worth lzma in the disk store, whose decode they pay for on every load."""
        return self.zeros > 0

    @property
    def dense(self) -> bool:
        return self.kind in ("bf16", "fp32")

    @property
    def adaptive(self) -> bool:
        return self.kind in GROUPED and self.group_size == 0

    def __str__(self) -> str:
        if self.zeros:
            return f"{self.kind}-z{self.zeros}"
        if self.kind not in GROUPED:
            return self.kind
        return f"{self.kind}-adaptive" if self.adaptive else f"{self.kind}-g{self.group_size}"


def parse_format(text: str) -> QFormat:
    """'bf16', 'fp32', 'int8', 'ternary', 'ternary-z80', 'int4' (= int4-g128), 'int4-g64', 'int3-adaptive', ..."""
    m = re.fullmatch(r"(bf16|fp32|int8|int4|int3|int2|ternary)(?:-(?:g(\d+)|(adaptive)|z([1-9]\d?)))?",
                     text.strip().lower())
    if m is None:
        raise FormatError(f"unknown weight format {text!r}: expected bf16, fp32, int8, ternary (or ternary-z80: 80% "
                          f"zeros), or int4/int3/int2 optionally followed by -g32, -g64, -g128 or -adaptive (e.g. "
                          f"'int4-g64')")
    kind, group, adaptive, zeros = m.groups()
    if (group or adaptive) and kind not in GROUPED:
        raise FormatError(f"{text!r}: {kind} takes no group size; -gN and -adaptive apply to int4/int3/int2 only")
    if zeros:
        return QFormat(kind, zeros=int(zeros))
    if adaptive:
        return QFormat(kind, 0)
    if kind in GROUPED:
        return QFormat(kind, int(group) if group else DEFAULT_GROUP_SIZE)
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


def _ternary_group(K: int) -> int:
    return next(g for g in (256, 128, 64, 32) if K % g == 0)  # kernel group for the row scale


def _check(fmt: QFormat, shape) -> tuple[int, int]:
    if len(shape) != 2:
        raise FormatError(f"expected one matrix [out_features, in_features], got shape {tuple(shape)}")
    N, K = (int(d) for d in shape)
    if fmt.adaptive:
        raise FormatError(f"{fmt} has no group size yet: call resolve_format(fmt, w) (or choose_group_size) first")
    if fmt.kind in GROUPED or fmt.kind == "ternary":
        G = fmt.group_size or 32
        if N % 16 or K % G:
            raise FormatError(f"{fmt} needs out_features divisible by 16 and in_features by {G} (torch's CPU int4 "
                              f"kernel), got [{N}, {K}]; pick another group size, or int8/bf16 for this matrix")
    return N, K


def storage_layout(fmt: QFormat, shape) -> Layout:
    """Names, shapes and dtypes of what `quantize` returns, in record order."""
    N, K = _check(fmt, shape)
    bf = torch.bfloat16
    if fmt.dense:
        return [("weight", (N, K), bf if fmt.kind == "bf16" else torch.float32)]
    if fmt.kind == "int8":
        return [("qweight", (N, K), torch.int8), ("scales", (N,), bf)]
    if fmt.kind == "ternary":
        return [("qweight", (2 * -(-N * K // 10),), torch.uint8), ("scales", (N,), bf)]
    qsz = ("qsz", (K // fmt.group_size, N, 2), bf)
    if fmt.kind == "int4":
        return [("qweight", (N, K // 2), torch.uint8), qsz]
    if fmt.kind == "int3":
        return [("qweight", (N * K // 4,), torch.uint8), ("qhigh", (N * K // 8,), torch.uint8), qsz]
    return [("qweight", (N * K // 4,), torch.uint8), qsz]


def compute_layout(fmt: QFormat, shape, device_type: str = "cpu") -> Layout:
    """Names, shapes and dtypes of the resident form on `device_type` ('cpu', 'cuda', ...)."""
    N, K = _check(fmt, shape)
    if fmt.dense or (device_type == "cpu" and fmt.kind == "int8"):
        return storage_layout(fmt, shape)
    if device_type != "cpu":
        return [("weight", (N, K), torch.bfloat16)]
    G = _ternary_group(K) if fmt.kind == "ternary" else fmt.group_size
    return [("qweight", (N, K // 2), torch.uint8), ("qsz", (K // G, N, 2), torch.bfloat16)]


# ---- quantize ------------------------------------------------------------------------------------

def quantize(w: torch.Tensor, fmt: QFormat) -> dict[str, torch.Tensor]:
    """W [N, K] (any float dtype) -> the storage form, laid out as `storage_layout(fmt, w.shape)`."""
    N, K = _check(fmt, w.shape)
    w = w.detach()
    if fmt.dense:
        return {"weight": w.to(torch.bfloat16 if fmt.kind == "bf16" else torch.float32, copy=True).contiguous()}
    w = w.float()
    if fmt.kind == "int8":
        scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-20).bfloat16()
        q = (w / scales.float()[:, None]).round_().clamp_(-127, 127).to(torch.int8)
        return {"qweight": q, "scales": scales}
    if fmt.kind == "ternary":
        t, scale = ternarize(w, fmt.zeros / 100 if fmt.zeros else None)
        stream = packing.kernel_order((t + 1).to(torch.uint8))            # digits 0..2, kernel order
        return {"qweight": packing.pack_base3(stream), "scales": scale.bfloat16()}
    bits = GROUPED[fmt.kind]
    codes, qsz = quantize_groups(w, bits, fmt.group_size)
    if fmt.kind == "int4":
        return {"qweight": packing.pack_int4(codes), "qsz": qsz}
    stream = packing.kernel_order(codes)
    if fmt.kind == "int2":
        return {"qweight": packing.pack_bits(stream, 2), "qsz": qsz}
    return {"qweight": packing.pack_bits(stream & 3, 2), "qhigh": packing.pack_bits(stream >> 2, 1), "qsz": qsz}


# ---- storage -> kernel form / dense ------------------------------------------------------------------

def _kernel_form(parts, fmt: QFormat, N: int, K: int, qweight: torch.Tensor | None = None,
                 qsz: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Storage -> (int4 kernel bytes [N, K/2] in the canonical layout, qsz [K/G, N, 2]), into the given tensors."""
    dev = parts["qweight"].device
    if qweight is None:
        qweight = parts["qweight"] if fmt.kind == "int4" else torch.empty(N, K // 2, dtype=torch.uint8, device=dev)
    flat = qweight.view(-1)
    if fmt.kind == "int4":
        if qweight is not parts["qweight"]:
            qweight.copy_(parts["qweight"])
    elif fmt.kind == "int2":
        packing.expand_2bit(parts["qweight"], 8 - 2, flat)
    elif fmt.kind == "int3":
        packing.add_high_bit(parts["qhigh"], packing.expand_2bit(parts["qweight"], 8 - 4, flat))
    else:  # ternary: digit t + 1 -> q = t + 8, group scale = row scale, zero 0
        packing.expand_base3(parts["qweight"], 8 - 1, flat)
    if fmt.kind == "ternary":
        G = _ternary_group(K)
        if qsz is None:
            qsz = torch.empty(K // G, N, 2, dtype=torch.bfloat16, device=dev)
        qsz[..., 0].copy_(parts["scales"].expand(K // G, N))
        qsz[..., 1].zero_()
    elif qsz is None:
        qsz = parts["qsz"]
    else:
        qsz.copy_(parts["qsz"])
    return qweight, qsz


def dequantize(parts: dict[str, torch.Tensor], fmt: QFormat, shape) -> torch.Tensor:
    """Storage form -> fp32 W [N, K] on the parts' device (the exact values the kernels multiply with)."""
    N, K = _check(fmt, shape)
    if fmt.dense:
        return parts["weight"].float().view(N, K)
    if fmt.kind == "int8":
        return parts["qweight"].float() * parts["scales"].float()[:, None]
    packed, qsz = _kernel_form(parts, fmt, N, K)
    G = K // qsz.shape[0]
    q = packing.unpack_int4(packed, N, K).float().view(N, K // G, G)
    scale, zero = qsz.float().permute(1, 0, 2).unbind(-1)                 # [N, K/G] each
    return ((q - 8) * scale[..., None] + zero[..., None]).view(N, K)


def unpack_codes(parts: dict[str, torch.Tensor], fmt: QFormat, shape) -> torch.Tensor:
    """The integer codes [N, K] of a quantized matrix: int8 values, kernel q in 0..15 for int4/3/2, or t in -1..1."""
    N, K = _check(fmt, shape)
    if fmt.kind == "int8":
        return parts["qweight"]
    q = packing.unpack_int4(_kernel_form(parts, fmt, N, K)[0], N, K)
    return q.to(torch.int8) - 8 if fmt.kind == "ternary" else q


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
    if device.type != "cpu" and not fmt.dense:
        parts = {k: v.to(device, non_blocking=True) for k, v in parts.items()}
        out["weight"].copy_(dequantize(parts, fmt, shape))
    elif fmt.dense or fmt.kind == "int8":
        for name, t in out.items():
            t.copy_(parts[name])
    elif packing.native_layout() == packing.CANONICAL:
        _kernel_form(parts, fmt, N, K, out["qweight"], out["qsz"])
    else:  # this CPU's kernel wants another row blocking: expand, then repack (~3 ms for 1024x3584)
        packed, qsz = _kernel_form(parts, fmt, N, K, qsz=out["qsz"])
        out["qweight"].copy_(packing.relayout_int4(packed, N, K, packing.CANONICAL, packing.native_layout()))
    return out


def qlinear(x: torch.Tensor, resident: dict[str, torch.Tensor], fmt: QFormat, shape) -> torch.Tensor:
    """y = x @ W.T for x [..., K] -> [..., N] in x.dtype. CPU kernels take bf16 activations (fp32 is 10-50x slower)."""
    N, K = int(shape[0]), int(shape[1])
    flat = x.dim() == 2  # a decode step's [1, K]: no reshape, and no conversion when already bf16 (no-op ops cost)
    x2 = x if flat else x.reshape(-1, K)
    if "weight" in resident:
        w = resident["weight"]
        y = F.linear(x2 if x2.dtype == w.dtype else x2.to(w.dtype), w)
    else:
        if x2.dtype != torch.bfloat16 or not x2.is_contiguous():
            x2 = x2.to(torch.bfloat16).contiguous()
        if fmt.kind == "int8":
            y = torch.ops.aten._weight_int8pack_mm(x2, resident["qweight"], resident["scales"])
        else:
            qsz = resident["qsz"]
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, resident["qweight"], K // qsz.shape[0], qsz)
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
