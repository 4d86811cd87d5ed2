"""ExpertLayout: the byte offsets of an expert's tensors inside one contiguous record.

One expert = one record, so moving an expert between tiers is a single copy of `nbytes` bytes, and a
resident slot is just a record-sized buffer whose tensors are views.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

ALIGN = 64  # bytes; keeps every view aligned for vectorised kernels

_DTYPES = {str(d).removeprefix("torch."): d for d in
           (torch.float32, torch.bfloat16, torch.float16, torch.uint8, torch.int8, torch.int32)}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class ExpertLayout:
    specs: tuple[TensorSpec, ...]

    @property
    def offsets(self) -> tuple[int, ...]:
        out, pos = [], 0
        for s in self.specs:
            out.append(pos)
            pos += -(-s.nbytes // ALIGN) * ALIGN
        return tuple(out)

    @property
    def nbytes(self) -> int:
        last = self.specs[-1]
        return self.offsets[-1] + -(-last.nbytes // ALIGN) * ALIGN

    def views(self, buf: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named tensors over a uint8 buffer of at least `nbytes` (no copy)."""
        return {s.name: buf[o:o + s.nbytes].view(s.dtype).view(s.shape) for s, o in zip(self.specs, self.offsets)}

    def pack(self, tensors: dict[str, torch.Tensor], buf: torch.Tensor) -> None:
        """Write `tensors` into `buf` at their offsets; padding bytes are zeroed so records are deterministic."""
        buf.zero_()
        for name, view in self.views(buf).items():
            view.copy_(tensors[name])

    def to_json(self) -> list:
        return [[s.name, list(s.shape), str(s.dtype).removeprefix("torch.")] for s in self.specs]

    @classmethod
    def from_json(cls, data: list) -> ExpertLayout:
        return cls(tuple(TensorSpec(n, tuple(shape), _DTYPES[d]) for n, shape, d in data))
