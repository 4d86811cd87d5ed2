"""Expert stores: where a record comes from when it is not resident.

RamStore   reads the checkpoint's safetensors on demand (mmap; the OS page cache is the RAM tier).
DiskStore  reads a converted store: one file of variable-length records (no padding) + index.json giving
           each record's offset, stored length, codec and checksum, written by `offload.convert`.
           `read_into` is one pread into a caller-owned buffer (plus a decode for compressed records).
Both fill a caller-owned uint8 buffer, so the prefetcher can stage into pinned memory or straight
into a resident slot.
"""
from __future__ import annotations

import json
import lzma
import os
from pathlib import Path
from typing import NamedTuple

import lz4.block
import torch
import xxhash

from offload.errors import OffloadError
from offload.layout import ExpertLayout
from offload.source import CheckpointSource, Key

INDEX = "index.json"
DATA = "experts.bin"
STORE_VERSION = 2  # 2: xxh3-64 record checksums (1 used crc32, 10x slower to verify), variable-length records

# Raw LZMA2 without container or check (each record has its xxh3) and without literal context (lc = lp = pb =
# 0): sparse ternary codes are i.i.d., so context bits only split the statistics. On the demo's ternary-z90
# records: 0.647 bits/param, vs xz's defaults 0.717 and the codes' order-0 entropy + scales 0.638.
LZMA_FILTERS = ({"id": lzma.FILTER_LZMA2, "preset": 6, "dict_size": 1 << 20, "lc": 0, "lp": 0, "pb": 0,
                 "nice_len": 273},)


def checksum(data) -> int:
    """A record's checksum: xxh3-64 (~27 GB/s here vs crc32's ~3 GB/s, so verifying every read stays cheap
    next to the read itself)."""
    return xxhash.xxh3_64_intdigest(data)


def decode(codec: str, data, raw_bytes: int) -> bytes:
    """A compressed record's stored bytes -> its `raw_bytes` record bytes (codec 'lz4' or 'lzma')."""
    if codec == "lz4":
        return lz4.block.decompress(data, uncompressed_size=raw_bytes)
    return lzma.decompress(data, format=lzma.FORMAT_RAW, filters=LZMA_FILTERS)


class Record(NamedTuple):
    """One index entry: [layer, expert, format, checksum, offset, length, codec] in index.json."""

    fmt: str
    digest: int
    offset: int
    length: int          # bytes stored in the data file
    codec: str | None    # None (raw), 'lz4' or 'lzma'


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
        self.source.read_into(key, self.layout.views(out[: self.record_bytes]))
        return self.record_bytes

    def close(self) -> None:
        pass


class DiskStore:
    """A converted store: records back to back, each read with one pread and checked against its xxh3-64."""

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
        try:
            self.record_bytes: int = self.index["record_bytes"]  # the largest decoded record: buffers hold any
            self.layouts = {fmt: ExpertLayout.from_json(lay) for fmt, lay in self.index["layouts"].items()}
            self._records = {(r[0], r[1]): Record(*r[2:]) for r in self.index["records"]}
        except (KeyError, TypeError, ValueError) as e:
            raise OffloadError(f"expert store index {self.dir / INDEX} is malformed ({e!r}); delete {self.dir} to "
                               f"rebuild the store") from None
        self.verify = verify
        path = self.dir / DATA
        expected = max((r.offset + r.length for r in self._records.values()), default=0)
        if not path.exists() or path.stat().st_size != expected:
            raise OffloadError(f"{path} is missing or truncated (expected {expected} bytes); delete {self.dir} to "
                               f"rebuild the store")
        self._fd = os.open(path, os.O_RDONLY)

    def keys(self) -> list[Key]:
        return list(self._records)

    def format_of(self, key: Key) -> str:
        return self._records[key].fmt

    def layout_of(self, key: Key) -> ExpertLayout:
        return self.layouts[self._records[key].fmt]

    def extent(self, key: Key) -> tuple[int, int]:
        """(offset, length) of record `key` in the data file: the bytes one read of it touches."""
        r = self._records[key]
        return r.offset, r.length

    def codec_of(self, key: Key) -> str | None:
        """How record `key` is stored: None (raw), 'lz4' or 'lzma'."""
        return self._records[key].codec

    def read_into(self, key: Key, out: torch.Tensor) -> int:
        """pread record `key` into `out` (CPU uint8, >= record_bytes), decoding it if compressed; returns the
        bytes read from disk."""
        r = self._records[key]
        view = memoryview(out.numpy()).cast("B")
        dst = view if r.codec is None else bytearray(r.length)  # compressed: read the stored bytes aside first
        got = os.preadv(self._fd, [memoryview(dst)[:r.length]], r.offset)
        if got != r.length or (self.verify and checksum(memoryview(dst)[:r.length]) != r.digest):
            raise self._corrupt(key, "checksum mismatch")
        if r.codec is not None:
            raw = self.layouts[r.fmt].nbytes
            try:
                data = decode(r.codec, dst, raw)
            except (lzma.LZMAError, lz4.block.LZ4BlockError):
                data = b""
            if len(data) != raw:
                raise self._corrupt(key, f"undecodable {r.codec} record")
            view[:raw] = data
        return r.length

    def _corrupt(self, key: Key, what: str) -> OffloadError:
        offset, length = self.extent(key)
        return OffloadError(f"{what} in {self.dir / DATA} for expert {key} (bytes {offset}..{offset + length}): the "
                            f"store is corrupt; delete {self.dir} to rebuild it")

    def drop_cached(self, key: Key | None = None) -> None:
        """Evict record `key` (None: the whole data file) from the OS page cache, so its next read comes from
        the device (benchmarks of the disk tier; no root needed). Dirty pages of a fresh store are synced first."""
        offset, length = (0, 0) if key is None else self.extent(key)
        if key is None:
            os.fsync(self._fd)
        os.posix_fadvise(self._fd, offset, length, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()
