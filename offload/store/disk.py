"""Expert stores: where a record comes from when it is not resident.

RamStore   reads the checkpoint's safetensors on demand (mmap; the OS page cache is the RAM tier).
DiskStore  reads a converted store: one file of variable-length records + index.json giving each record's
           offset, stored length, codec and checksum, written by `offload.store.convert`. `read_into` is one
           pread into a caller-owned buffer (plus a decode for compressed records), with O_DIRECT where
           the filesystem allows it.
Both fill a caller-owned uint8 buffer, so the prefetcher can stage into pinned memory or straight
into a resident slot.

Why direct I/O: a cold buffered read costs more time and CPU than an O_DIRECT one (page-cache fill and copy
out; `examples/direct_io.py` measures both) and pulls megabytes of readahead. Streaming experts through the page cache would also keep a second copy of them in RAM and evict what the
OS had cached. Direct reads need
the file offset, the length and the buffer address aligned to the device's block: the converter starts
every record of ALIGN_MIN bytes or more at a multiple of ALIGN, resident slots and staging buffers are
ALIGN-aligned with a length rounded up (`aligned_buffer`, `buffer_bytes`), and any other read goes through
an aligned bounce buffer (small records, stores written before alignment, unaligned caller buffers).
"""
from __future__ import annotations

import errno
import json
import os
import threading
from pathlib import Path
from typing import NamedTuple

import torch
import xxhash

from offload.errors import OffloadError
from offload.store.codec import CodecError, Dict16, decode
from offload.store.layout import ExpertLayout
from offload.store.source import CheckpointSource, Key

INDEX = "index.json"
DATA = "experts.bin"
STORE_VERSION = 3  # 3: the fingerprint covers sampled expert bytes; 2: xxh3-64 record checksums, variable lengths

ALIGN = 4096          # direct-I/O alignment: covers 512-byte and 4 KiB logical blocks
ALIGN_MIN = 64 << 10  # records this long start on an ALIGN boundary (padding costs them < 6.25%)


def round_up(n: int, align: int = ALIGN) -> int:
    return -(-n // align) * align


def aligned_buffer(nbytes: int) -> torch.Tensor:
    """A uint8 CPU tensor of `nbytes` whose address is ALIGN-aligned, so a direct read can fill it."""
    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    raw = torch.empty(nbytes + ALIGN, dtype=torch.uint8)
    skip = -raw.data_ptr() % ALIGN
    return raw[skip: skip + nbytes]


def checksum(data) -> int:
    """A record's checksum: xxh3-64 (~27 GB/s here vs crc32's ~3 GB/s, so verifying every read stays cheap
    next to the read itself)."""
    return xxhash.xxh3_64_intdigest(data)


class Record(NamedTuple):
    """One index entry: [layer, expert, format, checksum, offset, length, codec] in index.json."""

    fmt: str
    digest: int
    offset: int
    length: int          # bytes stored in the data file
    codec: str | None    # None (raw), 'lz4', 'lzma' or 'dict16'


def read_index(store_dir: Path) -> dict:
    """index.json of the store in `store_dir`, or an OffloadError naming it (unreadable, truncated, another version)."""
    path = Path(store_dir) / INDEX
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise OffloadError(f"cannot read expert store index {path} ({e}); delete {store_dir} to rebuild the "
                           f"store") from None
    if not isinstance(index, dict):
        raise OffloadError(f"expert store index {path} is malformed (not a JSON object); delete {store_dir} to "
                           f"rebuild the store")
    if index.get("version") != STORE_VERSION:
        raise OffloadError(f"store {store_dir} has version {index.get('version')}, this moe-offload reads version "
                           f"{STORE_VERSION}; delete {store_dir} to reconvert it (or use another store_dir)")
    return index


class RamStore:
    """Dense records made on demand from the checkpoint (mmap'd safetensors)."""

    tier = "ram"

    def __init__(self, source: CheckpointSource) -> None:
        self.source = source
        self.layout = source.layout
        self.record_bytes = self.buffer_bytes = source.layout.nbytes
        self.direct = False

    def keys(self) -> list[Key]:
        return self.source.keys()

    def layout_of(self, key: Key) -> ExpertLayout:
        return self.layout

    def read_into(self, key: Key, out: torch.Tensor) -> int:
        return self.source.read_into(key, self.layout.views(out[: self.record_bytes]))

    def close(self) -> None:
        pass


class DiskStore:
    """A converted store: records back to back, each read with one pread and checked against its xxh3-64.

    `direct`: read with O_DIRECT, bypassing the page cache (falls back to buffered reads, `self.direct` False,
    where the filesystem refuses it: tmpfs, some FUSE and network filesystems)."""

    tier = "disk"

    def __init__(self, store_dir: Path, verify: bool = True, direct: bool = True) -> None:
        self._fd = self._dfd = -1
        self.dir = Path(store_dir)
        self.index = read_index(self.dir)
        try:
            self.record_bytes: int = self.index["record_bytes"]  # the largest decoded record: buffers hold any
            # a buffer of this size at an ALIGN-aligned address takes any record without a bounce
            self.buffer_bytes = round_up(self.record_bytes)
            self.layouts = {fmt: ExpertLayout.from_json(lay) for fmt, lay in self.index["layouts"].items()}
            self._records = {(r[0], r[1]): Record(*r[2:]) for r in self.index["records"]}
        except (KeyError, TypeError, ValueError) as e:
            raise OffloadError(f"expert store index {self.dir / INDEX} is malformed ({e!r}); delete {self.dir} to "
                               f"rebuild the store") from None
        self._coders = {}  # per record kind: its stored Tunstall dictionary (dict16 stores)
        for fmt, entry in (self.index.get("dictionaries") or {}).items():
            try:
                self._coders[fmt] = Dict16.from_json(entry, self.layouts[fmt], fmt)
            except (OffloadError, KeyError, TypeError, AttributeError) as e:
                raise OffloadError(f"the dictionary of record kind {fmt} in {self.dir / INDEX} is corrupt ({e}); "
                                   f"delete {self.dir} to rebuild the store") from None
        self.verify = verify
        path = self.dir / DATA
        expected = max((r.offset + r.length for r in self._records.values()), default=0)
        if not path.exists() or path.stat().st_size != expected:
            raise OffloadError(f"{path} is missing or truncated (expected {expected} bytes); delete {self.dir} to "
                               f"rebuild the store")
        try:
            self._fd = os.open(path, os.O_RDONLY)
            self._dfd = _open_direct(path) if direct else -1
        except OSError as e:
            raise OffloadError(f"cannot open {path} ({e.strerror}); make it readable or delete {self.dir} to "
                               f"rebuild the store") from None
        self.direct = self._dfd >= 0
        self._local = threading.local()  # per thread: a bounce buffer for direct reads that need one

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

    def coder_of(self, key: Key) -> Dict16 | None:
        """The dict16 coder (with its stored dictionary) of record `key`'s kind, None where it has none."""
        return self._coders.get(self._records[key].fmt)

    def read_into(self, key: Key, out: torch.Tensor) -> int:
        """pread record `key` into `out` (CPU uint8, >= record_bytes), decoding it if compressed; returns the
        bytes read from disk."""
        r = self._records[key]
        view = memoryview(out.numpy()).cast("B")
        if self.direct:
            try:
                data, in_place = self._read_direct(key, r, view, out.data_ptr())
            except OSError as e:  # a filesystem that opens O_DIRECT files but refuses their reads
                if e.errno != errno.EINVAL:
                    raise self._corrupt(key, f"read error ({e.strerror})") from None
                self.direct = False
                return self.read_into(key, out)
        else:
            in_place = r.codec is None  # compressed: read the stored bytes aside first
            data = view if in_place else memoryview(bytearray(r.length))
            try:
                got = os.preadv(self._fd, [data[:r.length]], r.offset)
            except OSError as e:
                raise self._corrupt(key, f"read error ({e.strerror})") from None
            if got != r.length:
                raise self._corrupt(key, "short read")
            data = data[:r.length]
        if self.verify and checksum(data) != r.digest:
            raise self._corrupt(key, "checksum mismatch")
        if r.codec is not None:
            raw = self.layouts[r.fmt].nbytes
            try:
                decoded = decode(r.codec, data, raw, self._coders.get(r.fmt))
            except CodecError:
                decoded = b""
            if len(decoded) != raw:
                raise self._corrupt(key, f"undecodable {r.codec} record")
            view[:raw] = decoded
        elif not in_place:
            view[:r.length] = data
        return r.length

    def _read_direct(self, key: Key, r: Record, view: memoryview, address: int) -> tuple[memoryview, bool]:
        """(stored bytes of `r`, whether they are already in `view`), read with O_DIRECT: straight into `view`
        when the record starts on an ALIGN boundary and `view` is aligned with room for the rounded-up length,
        else through this thread's bounce buffer."""
        start = r.offset - r.offset % ALIGN
        head = r.offset - start
        n = round_up(head + r.length)
        in_place = r.codec is None and head == 0 and len(view) >= n and address % ALIGN == 0
        if in_place:
            buf = view
        else:
            bounce = getattr(self._local, "bounce", None)
            if bounce is None or bounce.numel() < n:
                bounce = self._local.bounce = aligned_buffer(round_up(n, 1 << 20))
            buf = memoryview(bounce.numpy()).cast("B")
        if os.preadv(self._dfd, [buf[:n]], start) < head + r.length:  # short only at the end of the file
            raise self._corrupt(key, "short read")
        return buf[head: head + r.length], in_place

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
        for fd in (self._fd, self._dfd):
            if fd >= 0:
                os.close(fd)
        self._fd = self._dfd = -1

    def __del__(self) -> None:
        self.close()


def _open_direct(path: Path) -> int:
    """A read-only O_DIRECT descriptor for `path`, or -1 where the OS or the filesystem has no direct I/O."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return -1
    try:
        return os.open(path, os.O_RDONLY | flag)
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
            return -1
        raise

