"""SafetensorsFile: read one tensor, or one expert's slice of a fused tensor, with a single pread.

We parse the (JSON) header ourselves and never mmap the file, so reading every expert once (conversion,
or a RAM-tier miss) leaves no mapped pages behind: the process's RSS holds only the buffers in use,
whatever the checkpoint size. The OS page cache still serves repeated reads.
"""
from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import torch

from offload.errors import OffloadError

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class SafetensorsFile:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise OffloadError(f"{self.path} is not a safetensors file (too short); re-save the checkpoint")
            (n,) = struct.unpack("<Q", head)
            raw = f.read(n)
        try:
            header = json.loads(raw)
        except ValueError:
            raise OffloadError(f"{self.path} has a corrupt safetensors header; re-download or re-save it") from None
        header.pop("__metadata__", None)
        self.header_bytes = raw
        self.data_start = 8 + n
        self.tensors: dict[str, tuple[str, tuple[int, ...], int, int]] = {
            name: (info["dtype"], tuple(info["shape"]), *info["data_offsets"]) for name, info in header.items()}

    def keys(self):
        return self.tensors.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name][1]

    def nbytes(self, name: str, index: int | None = None) -> int:
        """Bytes tensor `name` (or its `index`-th slice) takes in the file: what reading it costs."""
        _dtype, _shape, begin, end = self._extent(name, index)
        return end - begin

    def _extent(self, name: str, index: int | None) -> tuple[torch.dtype, tuple[int, ...], int, int]:
        """(dtype, shape, begin, end) of tensor `name`, or of its `index`-th slice along dim 0."""
        dtype_name, shape, begin, end = self.tensors[name]
        dtype = DTYPES.get(dtype_name)
        if dtype is None:
            raise OffloadError(f"{self.path}: tensor {name} has dtype {dtype_name}, which moe-offload cannot read")
        if index is not None:
            row = (end - begin) // shape[0]
            begin, end, shape = begin + index * row, begin + (index + 1) * row, shape[1:]
        return dtype, shape, begin, end

    def _pread(self, dst, begin: int, name: str) -> None:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            got = os.preadv(fd, [dst], self.data_start + begin)
        finally:
            os.close(fd)
        if got != len(dst):
            raise OffloadError(f"{self.path} is truncated (tensor {name}); re-download or re-save the checkpoint")

    def read(self, name: str, index: int | None = None) -> torch.Tensor:
        """Tensor `name`, or its `index`-th slice along dim 0 (one expert of a fused tensor)."""
        dtype, shape, begin, end = self._extent(name, index)
        buf = bytearray(end - begin)
        self._pread(buf, begin, name)
        if not buf or not math.prod(shape):
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).view(shape)

    def read_into(self, name: str, index: int | None, out: torch.Tensor) -> bool:
        """pread tensor `name` (or its `index`-th slice) straight into `out`: no buffer to allocate, zero and
        copy again. False (nothing read) when `out` is not a contiguous CPU tensor of the same dtype and size:
        the caller then converts through `read`."""
        dtype, shape, begin, end = self._extent(name, index)
        if out.dtype != dtype or out.device.type != "cpu" or not out.is_contiguous() or out.numel() != math.prod(shape):
            return False
        if end > begin:
            self._pread(memoryview(out.reshape(-1).view(torch.uint8).numpy()), begin, name)
        return True
