"""Expert stores: where a record comes from when it is not resident.

RamStore   reads the checkpoint's safetensors on demand (mmap; the OS page cache is the RAM tier).
DiskStore  reads a converted store: one file of fixed-size records + index.json with a checksum per
           record, written by `offload.convert`. `read_into` is one pread into a caller-owned buffer.
Both fill a caller-owned uint8 buffer, so the prefetcher can stage into pinned memory or straight
into a resident slot.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import lz4.block
import torch
import xxhash

from offload.errors import OffloadError
from offload.layout import ExpertLayout
from offload.source import CheckpointSource, Key

INDEX = "index.json"
DATA = "experts.bin"
STORE_VERSION = 2  # 2: xxh3-64 record checksums (1 used crc32, 10x slower to verify)


def checksum(data) -> int:
    """A record's checksum: xxh3-64 (~27 GB/s here vs crc32's ~3 GB/s, so verifying every read stays cheap
    next to the read itself)."""
    return xxhash.xxh3_64_intdigest(data)


class RamStore:
    """Dense records made on demand from the checkpoint (mmap'd safetensors)."""

    tier = "ram"

    def __init__(self, source: CheckpointSource) -> None:
        self.source = source
        self.layout = source.layout
        self.record_bytes = source.layout.nbytes

    def keys(self) -> list[Key]:
        return self.source.keys()

    def layout_of(self, key: Key) -> ExpertLayout:
        return self.layout

    def read_into(self, key: Key, out: torch.Tensor) -> int:
        self.layout.pack(self.source.read(key), out[: self.record_bytes])
        return self.record_bytes

    def close(self) -> None:
        pass


class DiskStore:
    """A converted store: fixed-size records at `i * record_bytes`, each checked against its xxh3-64."""

    tier = "disk"

    def __init__(self, store_dir: Path, verify: bool = True) -> None:
        self._fd = -1
        self.dir = Path(store_dir)
        try:
            self.index = json.loads((self.dir / INDEX).read_text())
        except (OSError, ValueError) as e:
            raise OffloadError(f"cannot read expert store index {self.dir / INDEX} ({e}); delete {self.dir} to "
                               f"rebuild the store") from None
        if self.index.get("version") != STORE_VERSION:
            raise OffloadError(f"store {self.dir} has version {self.index.get('version')}, this moe-offload reads "
                               f"version {STORE_VERSION}; delete {self.dir} to rebuild it")
        self.record_bytes: int = self.index["record_bytes"]
        self.layouts = {fmt: ExpertLayout.from_json(lay) for fmt, lay in self.index["layouts"].items()}
        self._records = {(r[0], r[1]): (i, r[2], r[3], r[4]) for i, r in enumerate(self.index["records"])}
        self.verify = verify
        path = self.dir / DATA
        expected = len(self._records) * self.record_bytes
        if not path.exists() or path.stat().st_size != expected:
            raise OffloadError(f"{path} is missing or truncated (expected {expected} bytes); delete {self.dir} to "
                               f"rebuild the store")
        self._fd = os.open(path, os.O_RDONLY)

    def keys(self) -> list[Key]:
        return list(self._records)

    def format_of(self, key: Key) -> str:
        return self._records[key][1]

    def layout_of(self, key: Key) -> ExpertLayout:
        return self.layouts[self._records[key][1]]

    def read_into(self, key: Key, out: torch.Tensor) -> int:
        """pread record `key` into `out` (CPU uint8, >= record_bytes); returns the bytes read from disk."""
        i, _fmt, digest, stored = self._records[key]
        n = stored or self.record_bytes
        view = memoryview(out.numpy()).cast("B")
        dst = view if stored is None else bytearray(n)  # lz4 record: read the packed bytes aside first
        got = os.preadv(self._fd, [memoryview(dst)[:n]], i * self.record_bytes)
        if got != n or (self.verify and checksum(memoryview(dst)[:n]) != digest):
            raise OffloadError(f"checksum mismatch in {self.dir / DATA} for expert {key} (record {i}): the store is "
                               f"corrupt; delete {self.dir} to rebuild it")
        if stored is not None:
            view[: self.record_bytes] = lz4.block.decompress(dst, uncompressed_size=self.record_bytes)
        return n

    def compressed(self) -> int:
        """How many records are stored lz4-compressed (only where it saved more than 5%)."""
        return sum(1 for r in self._records.values() if r[3] is not None)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()
