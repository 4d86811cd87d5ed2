"""Record compression in the disk store: lz4 where it pays; for sparse ternary kinds an entropy coder, lzma
(`Lzma`) or QMoE's Tunstall dictionary (`Dict16`), chosen per store (`entropy_coder=`)."""
from __future__ import annotations

import base64
import lzma

import lz4.block
import numpy as np
import xxhash

from offload.errors import OffloadError
from offload.store.layout import ExpertLayout
from offload.store.tunstall import TunstallDictionary

# Raw LZMA2 without container or check (each record has its xxh3) and without literal context (lc = lp = pb =
# 0): sparse ternary codes are i.i.d., so context bits only split the statistics. On the demo's ternary-z90
# records: 0.647 bits/param, vs xz's defaults 0.717 and the codes' order-0 entropy + scales 0.638.
LZMA_FILTERS = ({"id": lzma.FILTER_LZMA2, "preset": 6, "dict_size": 1 << 20, "lc": 0, "lp": 0, "pb": 0,
                 "nice_len": 273},)

PAYS = 0.95  # store a record compressed only when that saves more than 5% of its bytes
# lz4 is tried on a whole record only where it saves 2% or more of PROBES pieces of PROBE bytes spread evenly through
# it: quantized codes never pay (int8..int2: ratio 1.004) and their full trial cost 2-19% of a conversion.
PROBES, PROBE, PROBE_SAVES = 16, 4096, 0.98
DIGITS = np.array([[b // 3**i % 3 for i in range(5)] for b in range(243)], dtype=np.uint8)  # byte -> 5 base-3 digits


def ternary_segments(kind_name: str, layout: ExpertLayout) -> list[tuple[int, int, float]]:
    """(start, end, zero share) of each ternary matrix's base-3 code bytes in a record of `kind_name`
    ('ternary-z80/ternary-z90'); the error-optimal ternary counts as half zeros."""
    fmts = dict(zip(("gate_up", "down"), kind_name.split("/")))
    out = []
    for spec, offset in zip(layout.specs, layout.offsets):
        matrix, _, part = spec.name.partition(".")
        fmt = fmts.get(matrix, "")
        if part == "qweight" and fmt.startswith("ternary"):
            out.append((offset, offset + spec.nbytes, int(fmt.split("-z")[1]) / 100 if "-z" in fmt else 0.5))
    return out


class Lzma:
    """Raw LZMA2 over the whole record: ~25-45 MB/s to decode, a few MB/s to encode."""

    name = "lzma"

    def encode(self, record: memoryview) -> bytes:
        return lzma.compress(record, format=lzma.FORMAT_RAW, filters=LZMA_FILTERS)

    def decode(self, data, raw_bytes: int) -> bytes:
        return lzma.decompress(data, format=lzma.FORMAT_RAW, filters=LZMA_FILTERS)


class Dict16:
    """QMoE's coder for one sparse ternary record kind: the base-3 code bytes (each matrix's `qweight`) as one
    digit stream in 16-bit Tunstall codewords (offload/store/tunstall.py), every other byte kept as it is.
    Stored form: the other bytes in record order, then the coded digits. The dictionary is the kind's: built
    for its nominal zero share (ternary-zNN has exactly NN% zero codes per row, signs even), stored in the
    store's index, so every record decodes on its own."""

    name = "dict16"

    def __init__(self, dictionary: TunstallDictionary, layout: ExpertLayout, kind_name: str) -> None:
        self.dictionary = dictionary
        self.nbytes = layout.nbytes
        self.segments = [(a, b) for a, b, _ in ternary_segments(kind_name, layout)]
        self.digits = 5 * sum(b - a for a, b in self.segments)
        self.rest = np.ones(self.nbytes, dtype=bool)  # every byte outside the code segments, stored as it is
        for a, b in self.segments:
            self.rest[a:b] = False

    @classmethod
    def for_kind(cls, kind_name: str, layout: ExpertLayout) -> Dict16:
        """The coder for a record kind, its dictionary built from the kind's nominal digit probabilities."""
        spans = ternary_segments(kind_name, layout)
        zero = sum((b - a) * z for a, b, z in spans) / sum(b - a for a, b, _ in spans)
        return cls(TunstallDictionary.build(((1 - zero) / 2, zero, (1 - zero) / 2)), layout, kind_name)

    def to_json(self) -> dict:
        tree = self.dictionary.to_bytes()
        return {"coder": self.name, "tree": base64.b64encode(tree).decode(), "checksum": xxhash.xxh3_64_intdigest(tree)}

    @classmethod
    def from_json(cls, entry: dict, layout: ExpertLayout, kind_name: str) -> Dict16:
        """A stored dictionary; OffloadError where it is not one or its checksum does not match."""
        try:
            tree = base64.b64decode(entry["tree"], validate=True)
            ok = entry.get("coder") == cls.name and xxhash.xxh3_64_intdigest(tree) == entry["checksum"]
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise OffloadError("checksum mismatch")
        return cls(TunstallDictionary.from_bytes(tree), layout, kind_name)

    def encode(self, record: memoryview) -> bytes | None:
        """None where the code bytes are no base-3 digits (never for records `Ternary.pack` wrote)."""
        raw = np.frombuffer(record, dtype=np.uint8)
        codes = np.concatenate([raw[a:b] for a, b in self.segments])
        if codes.max(initial=0) >= 243:
            return None
        words = self.dictionary.encode(DIGITS[codes].ravel())
        return raw[self.rest].tobytes() + words.astype("<u2").tobytes()

    def decode(self, data, raw_bytes: int) -> bytes:
        """Stored bytes -> the record; ValueError where they do not decode to one."""
        data = np.frombuffer(data, dtype=np.uint8)
        keep = int(self.rest.sum())
        if (len(data) - keep) % 2:
            raise ValueError("odd codeword bytes")
        digits = self.dictionary.decode(data[keep:].view("<u2"), self.digits)
        out = np.empty(self.nbytes, dtype=np.uint8)
        out[self.rest] = data[:keep]
        d = digits.reshape(-1, 5)
        codes = d[:, 0] + 3 * d[:, 1] + 9 * d[:, 2] + 27 * d[:, 3] + 81 * d[:, 4]  # uint8: at most 242
        pos = 0
        for a, b in self.segments:
            out[a:b] = codes[pos:pos + b - a]
            pos += b - a
        return out.tobytes()


ENTROPY_CODERS = ("lzma", "dict16")  # what a store's entropy_coder setting may name; lzma is the default


def entropy_coder(name: str, kind_name: str, layout: ExpertLayout, dictionaries: dict) -> Lzma | Dict16:
    """A store's coder for one sparse record kind; Dict16 takes the kind's dictionary from `dictionaries`
    (the index's, on a resumed conversion) or builds it and adds it there."""
    if name == "lzma":
        return Lzma()
    if kind_name in dictionaries:
        return Dict16.from_json(dictionaries[kind_name], layout, kind_name)
    coder = Dict16.for_kind(kind_name, layout)
    dictionaries[kind_name] = coder.to_json()
    return coder


def lz4_may_pay(record: memoryview) -> bool:
    """Whether lz4 compresses evenly spread pieces of `record` (always true of records under 4x the probes)."""
    n = len(record)
    if n < 4 * PROBES * PROBE:
        return True
    step = n // PROBES
    sample = b"".join(record[i * step:i * step + PROBE] for i in range(PROBES))
    return len(lz4.block.compress(sample, store_size=False)) <= PROBE_SAVES * len(sample)


def compress(record: memoryview, entropy: Lzma | Dict16 | None = None) -> tuple[memoryview | bytes, str | None]:
    """(bytes to write, codec): lz4 where it measurably pays, then `entropy` where it beats that (or raw) too.
    An entropy coder only for kinds that ask for it (sparse ternary): lzma decodes at ~25-45 MB/s against
    lz4's GB/s; it would shave 6-11% off int8..int2 records at the cost of every hot-tier load."""
    best, codec = record, None
    packed = lz4.block.compress(record, store_size=False) if lz4_may_pay(record) else record
    if len(packed) <= PAYS * len(record):
        best, codec = packed, "lz4"
    if entropy is not None:
        packed = entropy.encode(record)
        if packed is not None and len(packed) <= PAYS * len(best):
            best, codec = packed, entropy.name
    return best, codec


def decode(codec: str, data, raw_bytes: int, entropy: Lzma | Dict16 | None = None) -> bytes:
    """A compressed record's stored bytes -> its `raw_bytes` record bytes (codec 'lz4', 'lzma' or 'dict16',
    whose coder `entropy` is the record kind's)."""
    if codec == "lz4":
        return lz4.block.decompress(data, uncompressed_size=raw_bytes)
    if codec == "lzma":
        return Lzma().decode(data, raw_bytes)
    if entropy is None or entropy.name != codec:
        raise ValueError(f"no {codec} coder for this record")
    return entropy.decode(data, raw_bytes)


CodecError = (lzma.LZMAError, lz4.block.LZ4BlockError, ValueError, IndexError)  # what `decode` raises on a corrupt record
