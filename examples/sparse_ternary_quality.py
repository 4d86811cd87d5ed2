"""Sparse ternary (ternary-zNN) on one model: weight-only thresholds, GPTQ with the support thresholded first,
and GPTQ choosing the support in its sweep (offload/formats/gptq.py), side by side.

    python examples/sparse_ternary_quality.py [MODEL_DIR] [--calibration FILE] [--formats ternary,ternary-z80,...]
                                              [--tokens 256] [--work-dir DIR]

MODEL_DIR defaults to the shipped demo model and --calibration to its calibration.txt. The calibration pass
runs once; every calibrated store is encoded from its statistics. Quality as examples/calibration_quality.py
defines it (offload-bench formats' helpers): perplexity on the first 2048 tokens of MODEL_DIR/heldout.txt,
greedy agreement with bf16 over --tokens new tokens; bits/param from the store's files; the calibration loss
is GPTQ's objective, sum over expert matrices of tr((W - Q) H (W - Q)^T), relative to weight-only. Prints a
Markdown table.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from offload.bench.formats import store_size
from offload.config import OffloadConfig
from offload.formats.record import MATRICES
from offload.model import OffloadedModel
from offload.store import calibrate
from offload.store.convert import codec_for, open_or_convert, store_settings
from offload.store.disk import DiskStore

from calibration_quality import Subject, arguments, quality

FORMATS = "ternary,ternary-z70,ternary-z80,ternary-z90"


def calibration_loss(store: DiskStore, codec, source, stats) -> float:
    """sum over calibrated expert matrices of tr((W - Q) H (W - Q)^T), Q the store's dequantized codes."""
    from offload.formats.quant import dequantize

    total = 0.0
    for key in store.keys():
        buf = torch.empty(store.buffer_bytes, dtype=torch.uint8)
        store.read_into(key, buf)
        kind = codec.kind_named(store.format_of(key))
        parts = kind.split(kind.storage.views(buf))
        dense = source.read(key)
        for i, m in enumerate(MATRICES):
            W = (dense[m].T if codec.transposed else dense[m]).float()
            E = W - dequantize(parts[m], kind.formats[i], kind.shapes[i])
            total += float(torch.einsum("nk,kl,nl->", E, stats[key][m], E))
    return total


def main() -> None:
    ap = arguments(__doc__, FORMATS)
    args = ap.parse_args()
    subject = Subject.open(args.model_dir)
    arch, source, total, params, window = subject.arch, subject.source, subject.total, subject.params, subject.window
    stats = calibrate.collect(source, args.calibration, torch.bfloat16, progress=False)

    ids, ref = subject.reference(args.model_dir, args.tokens)
    rows = [("bf16", "-", ref, None, 16.0, None)]
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or Path(tmp)
        for fmt in args.formats.split(","):
            variants = [("weights only", None), ("GPTQ, joint support", "joint")]
            if "-z" in fmt:
                variants.insert(1, ("GPTQ, support thresholded first", "fixed"))
            base = None
            for how, support in variants:
                store_dir = work / f"{fmt}-{support or 'weights'}"
                cal = str(args.calibration) if support else None
                cfg = OffloadConfig(store="disk", store_dir=str(store_dir), bits=fmt, cache_experts=total,
                                    calibration=cal)
                codec = codec_for(cfg, source, arch)
                settings = store_settings(cfg, codec)
                if support:
                    codec = calibrate.CalibratedCodec(codec, stats, support=support)
                t0 = time.perf_counter()
                store = open_or_convert(source, store_dir, settings, codec, progress=False)
                convert_s = time.perf_counter() - t0
                loss = calibration_loss(store, codec, source, stats)
                base = base or loss
                store.close()
                with OffloadedModel.from_pretrained(args.model_dir, config=cfg) as m:
                    q = quality(m, ids, window, ref["tokens"], args.tokens)
                bits = store_size(store_dir, params)["bits_per_param"]
                rows.append((fmt, how, q, convert_s, bits, loss / base))
                print(rows[-1][:2], f"ppl {q['ppl']:.2f} agree {q['agree']:.3f} bits {bits:.3f} loss {loss / base:.3f}",
                      flush=True)
    print("\n| format | quantized from | calibration loss | perplexity | vs bf16 | greedy agreement (first difference) "
          "| bits/param | encode s |\n|---|---|---:|---:|---:|---:|---:|---:|")
    for fmt, how, q, sec, bits, loss in rows:
        first = "-" if q["first"] is None else q["first"]
        print(f"| {fmt} | {how} | {'-' if loss is None else f'{loss:.3f}'} | {q['ppl']:.2f} | "
              f"{100 * (q['ppl'] / ref['ppl'] - 1):+.1f}% | {q['agree']:.3f} ({first}) | {bits:.3f} | "
              f"{'-' if sec is None else f'{sec:.1f}'} |")


if __name__ == "__main__":
    main()
