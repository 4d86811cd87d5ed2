"""Record compression in the disk store: lz4 where it pays, lzma for entropy-coded (sparse ternary) kinds."""
from __future__ import annotations

import lzma

import lz4.block

# Raw LZMA2 without container or check (each record has its xxh3) and without literal context (lc = lp = pb =
# 0): sparse ternary codes are i.i.d., so context bits only split the statistics. On the demo's ternary-z90
# records: 0.647 bits/param, vs xz's defaults 0.717 and the codes' order-0 entropy + scales 0.638.
LZMA_FILTERS = ({"id": lzma.FILTER_LZMA2, "preset": 6, "dict_size": 1 << 20, "lc": 0, "lp": 0, "pb": 0,
                 "nice_len": 273},)

PAYS = 0.95  # store a record compressed only when that saves more than 5% of its bytes


def compress(record: memoryview, try_lzma: bool) -> tuple[memoryview | bytes, str | None]:
    """(bytes to write, codec): lz4 where it measurably pays, then lzma where it beats that (or raw) too.
    lzma only for kinds that ask for it (sparse ternary): it decodes at ~25-45 MB/s against lz4's GB/s and
    compresses at a few MB/s; it would shave 6-11% off int8..int2 records (and ~20% off the tiny test models'
    bf16 ones) at the cost of every hot-tier load."""
    best, codec = record, None
    packed = lz4.block.compress(record, store_size=False)
    if len(packed) <= PAYS * len(record):
        best, codec = packed, "lz4"
    if try_lzma:
        packed = lzma.compress(record, format=lzma.FORMAT_RAW, filters=LZMA_FILTERS)
        if len(packed) <= PAYS * len(best):
            best, codec = packed, "lzma"
    return best, codec


def decode(codec: str, data, raw_bytes: int) -> bytes:
    """A compressed record's stored bytes -> its `raw_bytes` record bytes (codec 'lz4' or 'lzma')."""
    if codec == "lz4":
        return lz4.block.decompress(data, uncompressed_size=raw_bytes)
    return lzma.decompress(data, format=lzma.FORMAT_RAW, filters=LZMA_FILTERS)


CodecError = (lzma.LZMAError, lz4.block.LZ4BlockError)  # what `decode` raises on a corrupt record
