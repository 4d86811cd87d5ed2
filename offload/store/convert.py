"""Streaming, resumable conversion: checkpoint experts -> a DiskStore, one expert at a time.

Memory stays at one record plus fixed overhead whatever the model size. Records are written back to
back, each only as long as its kind's layout or its compressed form (lz4, lzma or dict16, per record, where it
pays); records of ALIGN_MIN bytes or more start on an ALIGN boundary (zero padding before them), so direct
I/O reads them straight into a slot. The data file grows as `experts.bin.partial`;
`journal.json` (rewritten atomically) lists the final records with their offsets, lengths, codecs and
checksums. Kill it anywhere and rerun: it truncates to the end of the last journaled record and goes on,
and the finished store is byte-identical to an uninterrupted run. `index.json`, written last and
atomically, is what makes a store valid.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import time
from pathlib import Path

import torch

from offload.errors import OffloadError
from offload.store.source import CheckpointSource
from offload.formats.budget import BitsBudget
from offload.formats.record import RecordCodec, format_rule
from offload.progress import progress_bar
from offload.store.codec import compress, entropy_coder
from offload.store.disk import (ALIGN, ALIGN_MIN, DATA, INDEX, STORE_VERSION, DiskStore, RamStore, checksum,
                                read_index)

JOURNAL = "journal.json"
PARTIAL = DATA + ".partial"
M_MMAP_THRESHOLD = -3  # mallopt parameter

@contextlib.contextmanager
def big_buffers_returned_to_the_os():
    """While converting, glibc mmaps (and on free, unmaps) every buffer of 1 MiB or more: its dynamic threshold
    would keep ~10 freed expert buffers in the heap, and peak RSS would grow with expert size. Afterwards the
    threshold goes back to glibc's default (128 KiB), so the process is left as a caller would expect it."""
    try:
        import ctypes

        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        yield
        return
    mallopt(M_MMAP_THRESHOLD, 1 << 20)
    try:
        yield
    finally:
        mallopt(M_MMAP_THRESHOLD, 128 << 10)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def open_or_convert(source: CheckpointSource, store_dir: Path, settings: dict, codec: RecordCodec | None = None,
                    progress: bool = True, verify: bool = True, direct: bool = True) -> DiskStore:
    """Reuse the store in `store_dir` if it was made from this checkpoint with these settings, else build it."""
    store_dir = Path(store_dir)
    if (store_dir / INDEX).exists():
        index = read_index(store_dir)
        if index.get("fingerprint") != source.fingerprint():
            raise OffloadError(f"store {store_dir} was made from a different checkpoint (its experts differ from "
                               f"{source.model_dir}'s); use another store_dir=PATH or delete {store_dir} "
                               f"to reconvert")
        if index.get("settings") != settings:
            raise OffloadError(f"store {store_dir} was made with {_describe(index.get('settings') or {})}, not "
                               f"{_describe(settings)}; use another store_dir=PATH or delete {store_dir} to rebuild it")
        return DiskStore(store_dir, verify=verify, direct=direct)
    with big_buffers_returned_to_the_os():
        convert(source, store_dir, settings, codec, progress)
    return DiskStore(store_dir, verify=verify, direct=direct)


def _describe(settings: dict) -> str:
    """Store settings for people: 'dtype bfloat16, format int4-g32' (the index keeps the format JSON-encoded)."""
    def plain(value) -> str:
        with contextlib.suppress(TypeError, ValueError):
            value = json.loads(value)
        return value if isinstance(value, str) else json.dumps(value)

    return ", ".join(f"{k} {plain(v)}" for k, v in settings.items())


def convert(source: CheckpointSource, store_dir: Path, settings: dict, codec: RecordCodec | None = None,
            progress: bool = True) -> Path:
    """Write the store, records encoded by `codec` (None: dense, in the checkpoint's layout); resumes a previous
    interrupted run with the same checkpoint and settings."""
    store_dir = Path(store_dir)
    if store_dir.exists() and not store_dir.is_dir():
        raise OffloadError(f"store_dir {store_dir} exists and is not a directory; choose another store_dir")
    record_bytes = codec.record_bytes if codec else source.layout.nbytes
    try:
        _write(source, store_dir, settings, codec, progress, record_bytes)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise OffloadError(f"disk full while writing the expert store in {store_dir} (needs up to "
                               f"{len(source.keys()) * record_bytes / 2**20:.0f} MiB); free space or choose another "
                               f"store_dir, then rerun to resume") from None
        raise OffloadError(f"cannot write the expert store in {store_dir} ({e.strerror}); choose a writable "
                           f"store_dir (--store-dir)") from None
    return store_dir


def _write(source: CheckpointSource, store_dir: Path, settings: dict, codec: RecordCodec | None, progress: bool,
           record_bytes: int) -> None:
    """`convert`'s writing half: every OSError it raises is about `store_dir` (checkpoint reads raise OffloadError)."""
    store_dir.mkdir(parents=True, exist_ok=True)
    encode = codec.encode if codec else lambda key, t: (settings.get("format", "dense"), source.layout, t)
    keys = source.keys()
    head = {"version": STORE_VERSION, "fingerprint": source.fingerprint(), "settings": settings,
            "record_bytes": record_bytes, "num_records": len(keys), **(codec.meta(keys) if codec else {})}
    journal_path, partial = store_dir / JOURNAL, store_dir / PARTIAL
    journal = {**head, "layouts": {}, "dictionaries": {}, "records": []}
    if journal_path.exists():
        try:
            old = json.loads(journal_path.read_text())
        except (OSError, ValueError):  # a journal only says what can be resumed: unreadable means start over
            old = {}
        if isinstance(old, dict) and {k: old.get(k) for k in head} == head:
            journal = old
            if not partial.exists() and (store_dir / DATA).exists():  # killed between the final rename and index
                os.replace(store_dir / DATA, partial)
    if not partial.exists():  # nothing written to resume from
        journal = {**head, "layouts": {}, "dictionaries": {}, "records": []}
    journal.setdefault("dictionaries", {})
    coders: dict = {}  # per record kind: its entropy coder (Dict16: with the kind's dictionary, kept in the index)
    done = len(journal["records"])
    end = journal["records"][-1][4] + journal["records"][-1][5] if done else 0  # offset + length of the last
    buf = torch.zeros(record_bytes, dtype=torch.uint8)
    dense = source.layout.views(torch.empty(source.layout.nbytes, dtype=torch.uint8))  # every expert read into it
    mode = "r+b" if done else "wb"
    shown = progress_bar("converting experts", len(keys) * record_bytes, progress, "bytes", done * record_bytes)
    with open(partial, mode) as f, shown as bar:
        f.truncate(end)
        f.seek(end)
        last_sync = time.monotonic()
        for i in range(done, len(keys)):
            key = keys[i]
            source.read_into(key, dense)
            fmt, layout, tensors = encode(key, dense)
            layout.pack(tensors, buf[: layout.nbytes])
            entropy = None
            if codec is not None and codec.entropy_coded(fmt):
                if fmt not in coders:
                    coders[fmt] = entropy_coder(settings.get("entropy_coder", "lzma"), fmt, layout,
                                                journal["dictionaries"])
                entropy = coders[fmt]
            data, how = compress(memoryview(buf[: layout.nbytes].numpy()), entropy)
            if len(data) >= ALIGN_MIN and end % ALIGN:  # long records start aligned: direct reads, no bounce
                f.write(bytes(-end % ALIGN))
                end += -end % ALIGN
            f.write(data)
            journal["layouts"].setdefault(fmt, layout.to_json())
            journal["records"].append([key[0], key[1], fmt, checksum(data), end, len(data), how])
            end += len(data)
            bar(record_bytes)
            if time.monotonic() - last_sync > 1.0 or i == len(keys) - 1:
                f.flush()
                os.fsync(f.fileno())
                atomic_write_text(journal_path, json.dumps(journal))
                last_sync = time.monotonic()
    os.replace(partial, store_dir / DATA)
    # a store without dictionaries has no such field: its index is as before they existed
    atomic_write_text(store_dir / INDEX, json.dumps({k: v for k, v in journal.items() if k != "dictionaries" or v}))
    journal_path.unlink()



def codec_for(cfg, source: CheckpointSource, arch) -> RecordCodec | None:
    """The record codec for cfg.bits (None: dense records in the model dtype)."""
    if cfg.bits in (None, 16):
        return None
    return RecordCodec(source.layout, format_rule(cfg.bits), arch.transposed, torch.device(cfg.device))


def open_store(cfg, source: CheckpointSource, codec: RecordCodec | None, progress: bool = True):
    """The store for an OffloadConfig: the checkpoint itself (ram) or the converted disk store, whose
    records `codec` (from `codec_for`) encodes."""
    if cfg.store == "ram":
        return RamStore(source)
    settings = store_settings(cfg, codec)
    if cfg.calibration:
        from offload.store.calibrate import calibrated_codec

        if not (Path(cfg.store_dir) / INDEX).exists():  # statistics only when there are records to write
            codec = calibrated_codec(codec, source, cfg.calibration, Path(cfg.store_dir), cfg.dtype, progress)
            if (budget := BitsBudget.of(cfg.bits)) is not None:
                from offload.store.allocation import budget_codec

                codec = budget_codec(codec, budget, source, Path(cfg.store_dir), settings["calibration"], progress)
    return open_or_convert(source, Path(cfg.store_dir), settings, codec, progress=progress, verify=cfg.verify,
                           direct=cfg.direct_io)


LOW_BIT_DIR = "low-bit-{}"  # the low-bit copy's store, inside store_dir (HOBBIT, `low_bit_miss`)


def low_bit_codec(cfg, source: CheckpointSource, arch) -> RecordCodec:
    """The CPU codec of the low-bit copies (`cfg.low_bit_miss`): they are computed on the CPU, from RAM."""
    return RecordCodec(source.layout, format_rule(cfg.low_bit_miss), arch.transposed, torch.device("cpu"))


def open_low_bit_store(cfg, source: CheckpointSource, codec: RecordCodec, progress: bool = True) -> DiskStore:
    """The low-bit copy of every expert (HOBBIT): a store of its own in store_dir, converted from the same
    checkpoint (weights alone) by `codec`, checksummed and resumable like the main one."""
    settings = settings_for(cfg.dtype, cfg.low_bit_miss)
    return open_or_convert(source, Path(cfg.store_dir) / LOW_BIT_DIR.format(cfg.low_bit_miss), settings, codec,
                           progress=progress, verify=cfg.verify, direct=cfg.direct_io)


def store_settings(cfg, codec: RecordCodec | None) -> dict:
    """What a store made for an OffloadConfig records (and must match to be reused)."""
    return settings_for(cfg.dtype, None if codec is None else cfg.bits, cfg.calibration, cfg.entropy_coder)


def settings_for(dtype, bits, calibration=None, entropy_coder: str = "lzma") -> dict:
    """A store's settings: checkpoint dtype, format (None: dense records), calibration text, entropy coder."""
    fmt = "dense" if bits is None else ("custom" if callable(bits) else json.dumps(bits, sort_keys=True))
    settings = {"dtype": str(dtype).removeprefix("torch."), "format": fmt}
    if calibration:
        from offload.store.calibrate import settings_of

        settings["calibration"] = settings_of(calibration)
    if entropy_coder != "lzma":  # only where it differs: stores made before the choice existed stay valid
        settings["entropy_coder"] = entropy_coder
    return settings


def build_store(model_dir, out: Path, bits=None, dtype="bfloat16", progress: bool = True,
                calibration: str | None = None, entropy_coder: str = "lzma") -> str:
    """`offload-convert`: write (or resume, or verify and reuse) the store for `model_dir`; returns a summary.

    The settings are exactly those `from_pretrained(..., store="disk", store_dir=out, bits=bits,
    calibration=calibration)` asks for, so the model reuses this store."""
    from offload.config import OffloadConfig
    from offload.store.source import open_checkpoint

    cfg = OffloadConfig(store="disk", store_dir=str(out), bits=bits, dtype=dtype, calibration=calibration,
                        entropy_coder=entropy_coder)
    _hf, arch, source, _k = open_checkpoint(model_dir, cfg.dtype)
    t0 = time.perf_counter()
    store = open_store(cfg, source, codec_for(cfg, source, arch), progress)
    n = len(store.keys())
    size, dense = (Path(out) / DATA).stat().st_size, n * source.layout.nbytes
    dt_s = max(time.perf_counter() - t0, 1e-9)
    store.close()
    return (f"{out}: {n} experts, {size / n / 2**20:.3f} MiB each on average ({size / 2**20:.1f} MiB, "
            f"{8 * size / (n * source.layout.nbytes / source.dtype.itemsize):.2f} bits/param) "
            f"in {dt_s:.1f} s, {dense / 2**20 / dt_s:.0f} MB/s of checkpoint experts")
