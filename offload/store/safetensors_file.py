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
        """Parse the header, and refuse a file too short for the tensors it lists (a truncated download) here,
        before transformers or a read deep inside generation trips over it."""
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) != 8:
                    raise OffloadError(f"{self.path} is not a safetensors file (too short); re-download or "
                                       f"re-save the checkpoint")
                (n,) = struct.unpack("<Q", head)
                raw = f.read(n)
                size = os.fstat(f.fileno()).st_size
        except OSError as e:
            raise OffloadError(f"cannot read {self.path} ({e.strerror}); check that it is a readable file, or "
                               f"re-download the checkpoint") from None
        try:
            header = json.loads(raw)
            header.pop("__metadata__", None)
            self.tensors: dict[str, tuple[str, tuple[int, ...], int, int]] = {
                name: (info["dtype"], tuple(info["shape"]), *info["data_offsets"]) for name, info in header.items()}
        except (ValueError, AttributeError, KeyError, TypeError):
            raise OffloadError(f"{self.path} has a corrupt safetensors header; re-download or re-save it") from None
        self.data_start = 8 + n
        need = self.data_start + max((t[3] for t in self.tensors.values()), default=0)
        if size < need:
            raise OffloadError(f"{self.path} is truncated ({size} of {need} bytes); re-download or re-save the "
                               f"checkpoint")

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
        try:
            fd = os.open(self.path, os.O_RDONLY)
            try:
                got = os.preadv(fd, [dst], self.data_start + begin)
            finally:
                os.close(fd)
        except OSError as e:
            raise OffloadError(f"cannot read tensor {name} from {self.path} ({e.strerror}); check the file, or "
                               f"re-download the checkpoint") from None
        if got != len(dst):
            raise OffloadError(f"{self.path} is truncated (tensor {name}); re-download or re-save the checkpoint")

    def samples(self, wanted: list[tuple[str, int | None]], block: int, per: int) -> list[list[bytes]]:
        """For each (tensor, slice index) in `wanted`: `per` (1-3) blocks of `block` bytes spread over its data
        (the middle; the start and end; or all three), one pread each over one descriptor. Enough to tell a
        fine-tune from its base without reading it."""
        out = []
        try:
            fd = os.open(self.path, os.O_RDONLY)
            try:
                for name, index in wanted:
                    _dtype, _shape, begin, end = self._extent(name, index)
                    n = end - begin
                    starts = {1: [n // 2 - block // 2], 2: [0, n - block], 3: [0, n // 2 - block // 2, n - block]}
                    spans = [(0, n)] if n <= per * block else [(s, block) for s in starts[per]]
                    out.append([os.pread(fd, length, self.data_start + begin + s) for s, length in spans])
            finally:
                os.close(fd)
        except OSError as e:
            raise OffloadError(f"cannot read {self.path} ({e.strerror}); check the file, or re-download the "
                               f"checkpoint") from None
        return out

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
