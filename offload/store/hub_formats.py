"""Hub formats: how a published checkpoint packs its tensors, and how to read one expert of them decoded.

A format groups a checkpoint's stored tensors into the *logical* tensors a bf16 checkpoint of the same model
would hold (`...experts.gate_up_proj`, `...experts.3.gate_proj.weight`), each knowing its dense shape, its bytes
on disk and how to decode one expert (one slice of a fused tensor) into the model dtype. So CheckpointSource,
the RAM tier and the converter read packed checkpoints exactly as they read bf16 ones, one expert at a time.

Dense         every tensor as stored (bf16 / fp16 / fp32 checkpoints).
Mxfp4Experts  GPT-OSS: `X_blocks` (two e2m1 codes a byte) + `X_scales` (e8m0, one per 32 inputs) -> X,
              one expert's slice at a time, bit-identical to transformers' `convert_moe_packed_tensors`.
BlockFp8      DeepSeek-V3/R1: float8_e4m3fn `X.weight` + float32 `X.weight_scale_inv`, one scale per
              `weight_block_size` block -> X.weight = weight * scale_inv, blocks ceil-divided at the edges.

transformers never sees the packed experts (our experts class has no parameters), and its own quantizers must
not be engaged: on CPU both fall back to dequantizing everything at load, the MXFP4 one would target expert
parameters that no longer exist, and the FP8 one derives the block from the scale grid (`rows // scale_rows`),
which decodes partial edge blocks wrongly (DeepSeek-V3's kv_a_proj_with_mqa, 576 rows under 5 scale rows,
raises). So `load_config` drops `quantization_config` for the load, and BlockFp8's `finish_load` overwrites the
non-expert projections (which transformers then casts from FP8 without their scales) with their decoded
values, one tensor at a time.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from offload.errors import OffloadError
from offload.store.safetensors_file import SafetensorsFile


class Tensor(Protocol):
    """One logical tensor of a checkpoint, whatever its packing."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    def disk_bytes(self, index: int | None = None) -> int: ...

    def read(self, index: int | None, dtype: torch.dtype) -> torch.Tensor: ...

    def read_into(self, index: int | None, out: torch.Tensor) -> int: ...

    def parts(self) -> list[Stored]: ...


@dataclass(frozen=True)
class Stored:
    """A tensor as stored: one pread, straight into the destination where dtypes match."""

    file: SafetensorsFile
    name: str

    @property
    def shape(self) -> tuple[int, ...]:
        return self.file.shape(self.name)

    def disk_bytes(self, index: int | None = None) -> int:
        return self.file.nbytes(self.name, index)

    def parts(self) -> list[Stored]:
        return [self]

    def read(self, index: int | None, dtype: torch.dtype) -> torch.Tensor:
        return self.file.read(self.name, index).to(dtype)

    def read_into(self, index: int | None, out: torch.Tensor) -> int:
        """Fill `out`; returns the bytes read from the checkpoint."""
        if not self.file.read_into(self.name, index, out):
            out.copy_(self.file.read(self.name, index))
        return self.disk_bytes(index)


DECODE_VALUES = 1 << 18  # values decoded per step of `Mxfp4Tensor.read_into` (1 MiB of fp32)
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)  # FP4 code -> value


def decode_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """blocks uint8 [..., out, G, 16] + scales uint8 [..., out, G] -> [..., G*32, out] in `dtype`, bit-identical
    to transformers' `convert_moe_packed_tensors` and ~10x faster (one gpt-oss gate_up, 1 thread: 63 vs 596 ms),
    which is what a RAM-tier miss costs: one byte -> two values gather, then one multiply per value."""
    # e2m1 values have 2 significant bits, so value * 2^k is exact in any dtype whose exponent range is fp32's;
    # transformers computes that product in fp32 and rounds once, which narrower dtypes (fp16) must repeat
    compute = dtype if torch.finfo(dtype).max >= torch.finfo(torch.float32).max else torch.float32
    table = torch.tensor(E2M1, dtype=compute)
    pairs = torch.stack([table[torch.arange(256) & 15], table[torch.arange(256) >> 4]], -1)  # low nibble first
    *lead, out, groups, half = blocks.shape
    values = torch.nn.functional.embedding(blocks.int(), pairs).view(*lead, out, groups, 2 * half)
    values.mul_(torch.exp2(scales.float() - 127).to(compute)[..., None])
    return values.view(*lead, out, groups * 2 * half).transpose(-1, -2).to(dtype)


@dataclass(frozen=True)
class Mxfp4Tensor:
    """GPT-OSS's packed experts: blocks [E, out, in/32, 16] + scales [E, out, in/32] -> [E, in, out], the
    transposed layout transformers' GptOssExperts holds."""

    blocks: Stored
    scales: Stored

    @property
    def shape(self) -> tuple[int, ...]:
        *lead, out, groups, half = self.blocks.shape
        return (*lead, groups * 2 * half, out)

    def disk_bytes(self, index: int | None = None) -> int:
        return self.blocks.disk_bytes(index) + self.scales.disk_bytes(index)

    def parts(self) -> list[Stored]:
        return [self.blocks, self.scales]

    def read(self, index: int | None, dtype: torch.dtype) -> torch.Tensor:
        return decode_mxfp4(self.blocks.file.read(self.blocks.name, index),
                            self.scales.file.read(self.scales.name, index), dtype).contiguous()

    def read_into(self, index: int | None, out: torch.Tensor) -> int:
        """Decoded a few output rows at a time: whole-matrix fp32 and int32 temporaries would cost ~4 experts of
        peak RAM per miss."""
        blocks = self.blocks.file.read(self.blocks.name, index)
        scales = self.scales.file.read(self.scales.name, index)
        rows = max(1, DECODE_VALUES // (blocks.shape[-2] * blocks.shape[-1] * 2))
        for a in range(0, blocks.shape[-3], rows):
            out[..., a:a + rows].copy_(decode_mxfp4(blocks[..., a:a + rows, :, :], scales[..., a:a + rows, :],
                                                    out.dtype))
        return self.disk_bytes(index)


@dataclass(frozen=True)
class Fp8Tensor:
    """A block-FP8 weight [..., rows, cols] with scale_inv [..., ceil(rows/bm), ceil(cols/bn)]."""

    weight: Stored
    scale: Stored
    block: tuple[int, int]

    @property
    def shape(self) -> tuple[int, ...]:
        return self.weight.shape

    def disk_bytes(self, index: int | None = None) -> int:
        return self.weight.disk_bytes(index) + self.scale.disk_bytes(index)

    def parts(self) -> list[Stored]:
        return [self.weight, self.scale]

    def read(self, index: int | None, dtype: torch.dtype) -> torch.Tensor:
        shape = self.shape[1:] if index is not None else self.shape
        out = torch.empty(shape, dtype=dtype)
        self.read_into(index, out)
        return out

    def read_into(self, index: int | None, out: torch.Tensor) -> int:
        """Decode into `out` one row block at a time: the float32 temporaries stay at one block row
        (128 x 7168 x 4 bytes = 3.7 MB on DeepSeek-V3) whatever the tensor."""
        q = self.weight.file.read(self.weight.name, index)
        s = self.scale.file.read(self.scale.name, index).float()
        bm, bn = self.block
        rows, cols = q.shape[-2:]
        if s.shape[-2:] != (-(-rows // bm), -(-cols // bn)):
            raise OffloadError(f"{self.scale.name} has shape {tuple(s.shape)}, not one scale per {bm}x{bn} block of "
                               f"{self.weight.name} {tuple(q.shape)}; config.json's weight_block_size does not "
                               f"match the checkpoint")
        for i in range(s.shape[-2]):
            r = slice(i * bm, min((i + 1) * bm, rows))
            out[..., r, :].copy_(q[..., r, :].float() * s[..., i:i + 1, :].repeat_interleave(bn, -1)[..., :cols])
        return self.disk_bytes(index)


def _stored(files: list[SafetensorsFile]) -> dict[str, Stored]:
    return {name: Stored(f, name) for f in files for name in f.keys()}


def _without_quantization(hf_config):
    """A copy of `hf_config` that does not engage transformers' quantizer (its experts are ours)."""
    out = copy.deepcopy(hf_config)
    for c in (out, out.get_text_config()):  # the same object for text-only models
        c.__dict__.pop("quantization_config", None)
    return out


class Dense:
    """Unpacked checkpoints: every tensor as stored."""

    name = "dense"

    def tensors(self, files: list[SafetensorsFile]) -> dict[str, Tensor]:
        return dict(_stored(files))

    def load_config(self, hf_config):
        return hf_config

    def finish_load(self, model: nn.Module, tensors: dict[str, Tensor]) -> None:
        """Nothing to fix: transformers loaded every non-expert tensor as it is."""


class Mxfp4Experts(Dense):
    """GPT-OSS's MXFP4 experts (non-expert weights are bf16 already)."""

    name = "mxfp4"

    def tensors(self, files: list[SafetensorsFile]) -> dict[str, Tensor]:
        stored = _stored(files)
        out: dict[str, Tensor] = {}
        for name, t in stored.items():
            stem = name.removesuffix("_blocks")
            if name.endswith("_blocks") and stem + "_scales" in stored:
                out[stem] = Mxfp4Tensor(t, stored[stem + "_scales"])
            elif not (name.endswith("_scales") and name.removesuffix("_scales") + "_blocks" in stored):
                out[name] = t
        return out

    def load_config(self, hf_config):
        return _without_quantization(hf_config)


class BlockFp8(Dense):
    """DeepSeek-V3/R1's block FP8: every projection, experts included."""

    name = "fp8"

    def __init__(self, block: tuple[int, int]) -> None:
        self.block = block

    def tensors(self, files: list[SafetensorsFile]) -> dict[str, Tensor]:
        stored = _stored(files)
        scales = {name.removesuffix("_scale_inv"): t for name, t in stored.items()
                  if name.endswith(".weight_scale_inv")}
        out: dict[str, Tensor] = {}
        for name, t in stored.items():
            if name in scales:
                out[name] = Fp8Tensor(t, scales[name], self.block)
            elif name.removesuffix("_scale_inv") not in scales:
                out[name] = t
        return out

    def load_config(self, hf_config):
        return _without_quantization(hf_config)

    def finish_load(self, model: nn.Module, tensors: dict[str, Tensor]) -> None:
        """Overwrite each non-expert FP8 projection (loaded by transformers as a bare cast of the FP8 codes)
        with its decoded value, in place."""
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, t in tensors.items():
                if not isinstance(t, Fp8Tensor):
                    continue
                if name not in params:
                    raise OffloadError(f"FP8 tensor {name} has no parameter of that name in transformers' "
                                       f"{type(model).__name__}; this checkpoint's names do not match its config")
                t.read_into(None, params[name].data)


def _fp8(q: dict) -> BlockFp8:
    block = q.get("weight_block_size")
    if not block or len(block) != 2:
        raise OffloadError("this FP8 checkpoint has no weight_block_size (per-tensor scales); moe-offload reads "
                           "block-FP8 checkpoints (DeepSeek-V3/R1) and bf16 ones: use a bf16 copy of the model")
    return BlockFp8((int(block[0]), int(block[1])))


FORMATS = {"mxfp4": lambda q: Mxfp4Experts(), "fp8": _fp8}  # quant_method -> format, from quantization_config


def hub_format(hf_config) -> Dense:
    """The format of a checkpoint, from config.json's quantization_config (none: Dense)."""
    q = getattr(hf_config, "quantization_config", None) or getattr(hf_config.get_text_config(), "quantization_config",
                                                                     None)
    if q is None:
        return Dense()
    q = q if isinstance(q, dict) else q.to_dict()
    method = str(q.get("quant_method"))
    if method not in FORMATS:
        raise OffloadError(f"config.json says the checkpoint is quantized with {method!r}, which moe-offload does "
                           f"not read; use the bf16 checkpoint of this model (or an MXFP4 / block-FP8 one)")
    return FORMATS[method](q)
