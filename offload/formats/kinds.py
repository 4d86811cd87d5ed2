"""One object per weight-format kind: its storage layout, quantizer, resident (compute) form and linear.

Legend: W [N, K] (out features N, in features K; y = x @ W.T), G group size along K.

`KINDS` maps a kind name to its object; `QFormat.kind_object` picks it once, so nothing downstream switches
on the kind. CPU compute forms are torch's kernel layouts (`_weight_int8pack_mm`, and for int4 and every
format coded as a subset of 0..15 - int3, int2, ternary - `_weight_int4pack_mm_for_cpu` with
w = (q - 8) * scale + zero); on other devices every quantized kind computes from dense bf16.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from offload.formats import packing
from offload.formats.groupwise import CHUNK, MAGIC, quantize_groups, shrinks
from offload.formats.ternary import ternarize

if TYPE_CHECKING:
    from offload.formats.quant import QFormat

Layout = list[tuple[str, tuple[int, ...], torch.dtype]]
Parts = dict[str, torch.Tensor]


def _bf16(x: torch.Tensor) -> torch.Tensor:
    """The CPU kernels' activations: contiguous bf16 (fp32 is 10-50x slower), converted only when they are not."""
    return x if x.dtype == torch.bfloat16 and x.is_contiguous() else x.to(torch.bfloat16).contiguous()


class Kind:
    """The operations of one kind; `fmt` carries its parameters (group size, zero share)."""

    name: str
    bits: int            # bits per code as stored (ternary: 2 here, packed at 1.6)
    dense = False        # stored and computed as plain floats
    grouped = False      # takes a group size along K (int4/int3/int2)

    def storage_layout(self, fmt: QFormat, N: int, K: int) -> Layout:
        raise NotImplementedError

    def quantize(self, fmt: QFormat, w: torch.Tensor) -> Parts:
        """W [N, K] (any float dtype and strides; converted a chunk at a time) -> the storage form, laid out as
        `storage_layout`."""
        raise NotImplementedError

    def dequantize(self, fmt: QFormat, parts: Parts, N: int, K: int) -> torch.Tensor:
        raise NotImplementedError

    def codes(self, fmt: QFormat, parts: Parts, N: int, K: int) -> torch.Tensor:
        raise NotImplementedError

    def compute_layout(self, fmt: QFormat, N: int, K: int, device_type: str) -> Layout:
        if device_type != "cpu":
            return [("weight", (N, K), torch.bfloat16)]
        return self.cpu_layout(fmt, N, K)

    def cpu_layout(self, fmt: QFormat, N: int, K: int) -> Layout:
        return self.storage_layout(fmt, N, K)

    def to_compute(self, fmt: QFormat, parts: Parts, N: int, K: int, device: torch.device, out: Parts) -> None:
        """Storage -> resident form in `out` (once per load, never per token)."""
        if device.type != "cpu":  # every quantized kind computes from dense bf16 off the CPU
            parts = {k: v.to(device, non_blocking=True) for k, v in parts.items()}
            out["weight"].copy_(self.dequantize(fmt, parts, N, K))
        else:
            self.to_cpu_form(fmt, parts, N, K, out)

    def to_cpu_form(self, fmt: QFormat, parts: Parts, N: int, K: int, out: Parts) -> None:
        for name, t in out.items():
            t.copy_(parts[name])

    def linear(self, x2: torch.Tensor, resident: Parts, N: int, K: int) -> torch.Tensor:
        """x2 [T, K] -> [T, N] (dtype of the kernel: the caller casts back)."""
        w = resident["weight"]
        return F.linear(x2 if x2.dtype == w.dtype else x2.to(w.dtype), w)


class Dense(Kind):
    dense = True

    def __init__(self, name: str, dtype: torch.dtype) -> None:
        self.name, self.dtype, self.bits = name, dtype, dtype.itemsize * 8

    def storage_layout(self, fmt, N, K):
        return [("weight", (N, K), self.dtype)]

    def compute_layout(self, fmt, N, K, device_type):
        return self.storage_layout(fmt, N, K)

    def quantize(self, fmt, w):
        return {"weight": w.to(self.dtype, copy=True).contiguous()}

    def dequantize(self, fmt, parts, N, K):
        return parts["weight"].float().view(N, K)

    def to_compute(self, fmt, parts, N, K, device, out):
        out["weight"].copy_(parts["weight"])


class Int8(Kind):
    """Symmetric per output channel."""

    name, bits = "int8", 8

    def storage_layout(self, fmt, N, K):
        return [("qweight", (N, K), torch.int8), ("scales", (N,), torch.bfloat16)]

    def quantize(self, fmt, w):
        """A chunk of rows at a time through one reused fp32 buffer: no fp32 copy of the matrix is made."""
        N, K = w.shape
        q = torch.empty(N, K, dtype=torch.int8, device=w.device)
        scales = torch.empty(N, dtype=torch.bfloat16, device=w.device)
        rows = max(1, CHUNK // K)
        buf = torch.empty(min(rows, N) * K, device=w.device)
        for r in range(0, N, rows):
            x = buf[:min(rows, N - r) * K].view(-1, K).copy_(w[r:r + rows])
            s = scales[r:r + rows].copy_((torch.maximum(x.amax(1), x.amin(1).neg_()) / 127).clamp_(min=1e-20))
            x.div_(s.float()[:, None]).round_().clamp_(-127, 127).add_(MAGIC + 256)  # int32 view: low byte = code
            q[r:r + rows] = x.view(torch.int32)
        return {"qweight": q, "scales": scales}

    def dequantize(self, fmt, parts, N, K):
        return parts["qweight"].float() * parts["scales"].float()[:, None]

    def codes(self, fmt, parts, N, K):
        return parts["qweight"]

    def linear(self, x2, resident, N, K):
        if "weight" in resident:
            return super().linear(x2, resident, N, K)
        return torch.ops.aten._weight_int8pack_mm(_bf16(x2), resident["qweight"], resident["scales"])


class Int4Coded(Kind):
    """Kinds whose codes are a subset of 0..15, computed on the CPU by torch's int4 kernel: each expands its
    storage codes into kernel bytes (`expand`) and supplies the kernel's [K/G, N, 2] scale/zero table."""

    def kernel_group(self, fmt: QFormat, K: int) -> int:
        return fmt.group_size

    def cpu_layout(self, fmt, N, K):
        G = self.kernel_group(fmt, K)
        return [("qweight", (N, K // 2), torch.uint8), ("qsz", (K // G, N, 2), torch.bfloat16)]

    def expand(self, parts: Parts, flat: torch.Tensor) -> None:
        """Storage codes -> int4 kernel bytes (canonical layout), written into `flat` [N * K / 2]."""
        raise NotImplementedError

    def fill_qsz(self, fmt: QFormat, parts: Parts, qsz: torch.Tensor, N: int, K: int) -> None:
        qsz.copy_(parts["qsz"])

    def kernel_form(self, fmt: QFormat, parts: Parts, N: int, K: int, qweight: torch.Tensor | None = None,
                    qsz: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Storage -> (kernel bytes [N, K/2] in the canonical layout, qsz [K/G, N, 2]), into the given tensors."""
        dev = parts["qweight"].device
        if qweight is None:
            qweight = torch.empty(N, K // 2, dtype=torch.uint8, device=dev)
        self.expand(parts, qweight.view(-1))
        if qsz is None:
            qsz = torch.empty(K // self.kernel_group(fmt, K), N, 2, dtype=torch.bfloat16, device=dev)
        self.fill_qsz(fmt, parts, qsz, N, K)
        return qweight, qsz

    def dequantize(self, fmt, parts, N, K):
        packed, qsz = self.kernel_form(fmt, parts, N, K)
        G = K // qsz.shape[0]
        q = packing.unpack_int4(packed, N, K).float().view(N, K // G, G)
        scale, zero = qsz.float().permute(1, 0, 2).unbind(-1)                 # [N, K/G] each
        return ((q - 8) * scale[..., None] + zero[..., None]).view(N, K)

    def codes(self, fmt, parts, N, K):
        return packing.unpack_int4(self.kernel_form(fmt, parts, N, K)[0], N, K)

    def to_cpu_form(self, fmt, parts, N, K, out):
        if packing.native_layout() == packing.CANONICAL:
            self.kernel_form(fmt, parts, N, K, out["qweight"], out["qsz"])
        else:  # this CPU's kernel wants another row blocking: expand, then repack (~3 ms for 1024x3584)
            packed, _ = self.kernel_form(fmt, parts, N, K, qsz=out["qsz"])
            out["qweight"].copy_(packing.relayout_int4(packed, N, K, packing.CANONICAL, packing.native_layout()))

    def linear(self, x2, resident, N, K):
        if "weight" in resident:
            return super().linear(x2, resident, N, K)
        qsz = resident["qsz"]
        return torch.ops.aten._weight_int4pack_mm_for_cpu(_bf16(x2), resident["qweight"], K // qsz.shape[0], qsz)


class Grouped(Int4Coded):
    """Asymmetric min/max per group of G along K with a searched clipping range; `bits` 4, 3 or 2."""

    grouped = True

    def __init__(self, bits: int) -> None:
        self.name, self.bits = f"int{bits}", bits

    def qsz_spec(self, fmt: QFormat, N: int, K: int):
        return ("qsz", (K // fmt.group_size, N, 2), torch.bfloat16)

    def quantize(self, fmt, w):
        codes, qsz = quantize_groups(w, self.bits, fmt.group_size, shrinks(self.bits, fmt.group_size, fmt.clip))
        return {**self.pack(codes), "qsz": qsz}

    def pack(self, codes: torch.Tensor) -> Parts:
        raise NotImplementedError


class Int4(Grouped):
    def __init__(self) -> None:
        super().__init__(4)

    def storage_layout(self, fmt, N, K):
        return [("qweight", (N, K // 2), torch.uint8), self.qsz_spec(fmt, N, K)]

    def pack(self, codes):
        return {"qweight": packing.pack_int4(codes)}

    def expand(self, parts, flat):
        flat.copy_(parts["qweight"].view(-1))

    def kernel_form(self, fmt, parts, N, K, qweight=None, qsz=None):
        if qweight is None and qsz is None:  # already the kernel's bytes: no copy
            return parts["qweight"], parts["qsz"]
        return super().kernel_form(fmt, parts, N, K, qweight, qsz)


class Int3(Grouped):
    """Low two bits and the high bit in separate planes (2 + 1 bits per code)."""

    def __init__(self) -> None:
        super().__init__(3)

    def storage_layout(self, fmt, N, K):
        return [("qweight", (N * K // 4,), torch.uint8), ("qhigh", (N * K // 8,), torch.uint8),
                self.qsz_spec(fmt, N, K)]

    def pack(self, codes):
        kernel = packing.pack_int4(codes)
        return {"qweight": packing.pack_low2(kernel), "qhigh": packing.pack_bit2(kernel)}

    def expand(self, parts, flat):
        packing.add_high_bit(parts["qhigh"], packing.expand_2bit(parts["qweight"], 8 - 4, flat))


class Int2(Grouped):
    def __init__(self) -> None:
        super().__init__(2)

    def storage_layout(self, fmt, N, K):
        return [("qweight", (N * K // 4,), torch.uint8), self.qsz_spec(fmt, N, K)]

    def pack(self, codes):
        return {"qweight": packing.pack_low2(packing.pack_int4(codes))}

    def expand(self, parts, flat):
        packing.expand_2bit(parts["qweight"], 8 - 2, flat)


class Ternary(Int4Coded):
    """Per-row scale, codes in {-1, 0, 1} packed five to a byte (1.6 bits); ternary-zNN fixes NN% of zeros."""

    name, bits = "ternary", 2

    def kernel_group(self, fmt, K):
        return next(g for g in (256, 128, 64, 32) if K % g == 0)  # kernel group for the row scale

    def storage_layout(self, fmt, N, K):
        return [("qweight", (2 * -(-N * K // 10),), torch.uint8), ("scales", (N,), torch.bfloat16)]

    def quantize(self, fmt, w):
        return self.pack(*ternarize(w, fmt.zeros / 100 if fmt.zeros else None))

    def pack(self, t: torch.Tensor, scale: torch.Tensor) -> Parts:
        """t [N, K] in {-1, 0, 1} and the row scales [N] -> the storage form."""
        stream = packing.kernel_order((t + 1).to(torch.uint8))            # digits 0..2, kernel order
        return {"qweight": packing.pack_base3(stream), "scales": scale.bfloat16()}

    def expand(self, parts, flat):
        packing.expand_base3(parts["qweight"], 8 - 1, flat)              # digit t + 1 -> q = t + 8

    def fill_qsz(self, fmt, parts, qsz, N, K):
        qsz[..., 0].copy_(parts["scales"].expand(K // self.kernel_group(fmt, K), N))  # group scale = row scale
        qsz[..., 1].zero_()

    def codes(self, fmt, parts, N, K):
        return super().codes(fmt, parts, N, K).to(torch.int8) - 8


KINDS: dict[str, Kind] = {k.name: k for k in (Dense("bf16", torch.bfloat16), Dense("fp32", torch.float32), Int8(),
                                              Int4(), Int3(), Int2(), Ternary())}
