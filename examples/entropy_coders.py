"""Sparse ternary records: raw, lz4, lzma and dict16 (QMoE's Tunstall dictionary) on bits/param and decode time.

    python examples/entropy_coders.py [MODEL_DIR] [--formats ternary-z70,ternary-z80,ternary-z90] [--repeats 3]
                                      [--wide 2048x1408] [--work-dir DIR]

For each format, the model's store is converted twice (weight-only codes, entropy_coder lzma and dict16);
bits/param counts the store's files (index.json, which holds dict16's dictionary, plus experts.bin). lz4 and
raw re-code the same records (what a store of them would hold, index excluded). Decode: ms per expert to turn
the stored bytes into the record (in memory: no read, no checksum), median over every expert and --repeats
rounds; for dict16 also the dictionary's load when the store opens. --wide adds one synthetic expert of a
larger model (hidden x intermediate; Gaussian weights), its gate_up and down coded as one record. One thread.
"""
from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import lz4.block
import torch

from offload.formats.quant import parse_format, quantize, storage_layout
from offload.formats.record import MATRICES
from offload.store.codec import Dict16, Lzma, decode
from offload.store.convert import build_store
from offload.store.disk import DATA, INDEX, DiskStore
from offload.store.layout import ExpertLayout, TensorSpec
from offload.store.source import open_checkpoint

DEMO = Path(__file__).resolve().parents[1] / "offload" / "demo_model"


def timed(fn, repeats: int) -> float:
    """Median seconds of `fn()` over `repeats` calls."""
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def stored(store: DiskStore) -> list[tuple[tuple[bytes, int], tuple]]:
    """((stored bytes, raw record bytes), key) of every record, read as the store holds them."""
    out = []
    with open(store.dir / DATA, "rb") as f:
        data = f.read()
    for key in store.keys():
        off, n = store.extent(key)
        out.append(((data[off:off + n], store.layout_of(key).nbytes), key))
    return out


def demo_rows(model_dir: Path, fmt: str, work: Path, repeats: int) -> list[dict]:
    _, _, source, _ = open_checkpoint(model_dir, torch.bfloat16)
    params = len(source.keys()) * sum(math.prod(s.shape) for s in source.layout.specs)
    rows = []
    for coder in ("lzma", "dict16"):
        out = work / f"{fmt}-{coder}"
        t0 = time.perf_counter()
        build_store(model_dir, out, bits=fmt, progress=False, entropy_coder=coder)
        encode_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        store = DiskStore(out, verify=False)
        open_s = time.perf_counter() - t0
        records = stored(store)
        files = (out / INDEX).stat().st_size + (out / DATA).stat().st_size
        per = [timed(lambda: decode(coder, d, n, store.coder_of(key)), repeats) for (d, n), key in records]
        rows.append({"format": fmt, "codec": coder, "bits": 8 * files / params, "what": "store files",
                     "decode_ms": 1e3 * statistics.median(per), "encode_s": encode_s, "open_s": open_s})
        if coder == "lzma":
            raws = [Lzma().decode(d, n) for (d, n), _ in records]
            lz = [lz4.block.compress(r, store_size=False) for r in raws]
            per = [timed(lambda: lz4.block.decompress(c, uncompressed_size=len(r)), repeats) for c, r in zip(lz, raws)]
            rows.append({"format": fmt, "codec": "lz4", "bits": 8 * sum(map(len, lz)) / params,
                         "what": "records re-coded", "decode_ms": 1e3 * statistics.median(per)})
            rows.append({"format": fmt, "codec": "raw", "bits": 8 * sum(map(len, raws)) / params,
                         "what": "records re-coded", "decode_ms": 0.0})
        store.close()
    return rows


def wide_rows(fmt: str, hidden: int, inter: int, repeats: int) -> list[dict]:
    """One synthetic expert [2I, H] + [H, I] of Gaussian weights, coded as one record of kind fmt/fmt."""
    q = parse_format(fmt)
    g = torch.Generator().manual_seed(0)
    shapes = {"gate_up": (2 * inter, hidden), "down": (hidden, inter)}
    specs, tensors = [], {}
    for m in MATRICES:
        parts = quantize(torch.randn(*shapes[m], generator=g), q)
        for name, shape, dt in storage_layout(q, shapes[m]):
            specs.append(TensorSpec(f"{m}.{name}", tuple(shape), dt))
            tensors[f"{m}.{name}"] = parts[name]
    layout = ExpertLayout(tuple(specs))
    buf = torch.zeros(layout.nbytes, dtype=torch.uint8)
    layout.pack(tensors, buf)
    record = memoryview(buf.numpy())
    params = sum(math.prod(s) for s in shapes.values())
    kind = f"{fmt}/{fmt}"
    t0 = time.perf_counter()
    d16 = Dict16.for_kind(kind, layout)
    build_s = time.perf_counter() - t0
    rows = []
    for name, enc, dec in (
            ("raw", lambda: bytes(record), lambda c: c),
            ("lz4", lambda: lz4.block.compress(record, store_size=False),
             lambda c: lz4.block.decompress(c, uncompressed_size=layout.nbytes)),
            ("lzma", lambda: Lzma().encode(record), lambda c: Lzma().decode(c, layout.nbytes)),
            ("dict16", lambda: d16.encode(record), lambda c: d16.decode(c, layout.nbytes))):
        t0 = time.perf_counter()
        coded = enc()
        encode_s = time.perf_counter() - t0
        assert dec(coded) == bytes(record), name
        extra = len(d16.to_json()["tree"]) if name == "dict16" else 0  # its dictionary, as the index holds it
        rows.append({"format": f"{fmt} {hidden}x{inter}", "codec": name, "bits": 8 * (len(coded) + extra) / params,
                     "what": "one record" + (" + dictionary" if extra else ""),
                     "decode_ms": 1e3 * timed(lambda: dec(coded), repeats), "encode_s": encode_s,
                     "open_s": build_s if name == "dict16" else None})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", nargs="?", type=Path, default=DEMO)
    ap.add_argument("--formats", default="ternary-z70,ternary-z80,ternary-z90")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--wide", default="2048x1408", help="hidden x intermediate of the synthetic expert ('' for none)")
    ap.add_argument("--work-dir", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in args.formats.split(","):
            rows += demo_rows(args.model_dir, fmt, args.work_dir or Path(tmp), args.repeats)
            if args.wide:
                rows += wide_rows(fmt, *map(int, args.wide.split("x")), args.repeats)
    print("| format | codec | bits/param | measured from | decode ms per expert | convert / encode s | dictionary load s |\n"
          "|---|---|---:|---|---:|---:|---:|")
    for r in rows:
        enc = f"{r['encode_s']:.2f}" if r.get("encode_s") is not None else "-"
        opn = f"{r['open_s']:.2f}" if r.get("open_s") is not None and r["codec"] == "dict16" else "-"
        print(f"| {r['format']} | {r['codec']} | {r['bits']:.3f} | {r['what']} | {r['decode_ms']:.2f} | {enc} | {opn} |")


if __name__ == "__main__":
    main()
