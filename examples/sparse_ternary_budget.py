"""Sparse ternary at a bits budget (ternary-bX, offload/formats/budget.py) against fixed shares of zeros and
calibrated int2, on one model.

    python examples/sparse_ternary_budget.py [MODEL_DIR] [--calibration FILE] [--budgets 1.0,0.8,0.6]
                                             [--formats ternary-z70,ternary-z80,ternary-z90,int2-g32] [--tokens 256]

MODEL_DIR defaults to the shipped demo model and --calibration to its calibration.txt. The calibration pass
and the budget's per-matrix measurements run once; every store is converted with GPTQ from those statistics
and evaluated as examples/calibration_quality.py does (perplexity on the first 2048 tokens of
MODEL_DIR/heldout.txt, greedy agreement with bf16 over --tokens new tokens); bits/param from the store's
files. Prints a Markdown table.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from offload.bench.formats import store_size
from offload.config import OffloadConfig
from offload.formats.budget import ZEROS, BitsBudget
from offload.formats.record import MATRICES
from offload.model import OffloadedModel
from offload.store import calibrate
from offload.store.allocation import BudgetCodec, choose, measure
from offload.store.convert import codec_for, open_or_convert, store_settings

from calibration_quality import Subject, arguments, quality


def main() -> None:
    ap = arguments(__doc__, "ternary-z70,ternary-z80,ternary-z90,int2-g32")
    ap.add_argument("--budgets", default="1.0,0.8,0.6")
    args = ap.parse_args()
    subject = Subject.open(args.model_dir)
    arch, source, total, params, window = subject.arch, subject.source, subject.total, subject.params, subject.window
    stats = calibrate.collect(source, args.calibration, torch.bfloat16, progress=False)

    ids, ref = subject.reference(args.model_dir, args.tokens)
    rows = [("bf16", ref, 16.0, "-", None)]
    budgets = [f"ternary-b{b}" for b in args.budgets.split(",") if b]
    costs = None
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or Path(tmp)
        for fmt in [f for f in args.formats.split(",") if f] + budgets:
            cfg = OffloadConfig(store="disk", store_dir=str(work / fmt), bits=fmt, cache_experts=total,
                                calibration=str(args.calibration))
            codec = calibrate.CalibratedCodec(codec_for(cfg, source, arch), stats)
            t0 = time.perf_counter()
            note = "-"
            if (budget := BitsBudget.of(fmt)) is not None:
                if costs is None:
                    costs = measure(codec, source)
                    print(f"measured {len(costs.error)} matrices x {len(ZEROS)} shares in "
                          f"{time.perf_counter() - t0:.0f} s", flush=True)
                choice = choose(costs, budget, source, codec)
                codec = BudgetCodec(codec, budget, choice)
                mean = {m: sum(choice[tuple(k)][i] for k in source.keys()) / total for i, m in enumerate(MATRICES)}
                note = ", ".join(f"{m} {mean[m]:.1f}%" for m in MATRICES)
            store = open_or_convert(source, work / fmt, store_settings(cfg, codec), codec, progress=False)
            store.close()
            sec = time.perf_counter() - t0
            with OffloadedModel.from_pretrained(args.model_dir, config=cfg) as m:
                q = quality(m, ids, window, ref["tokens"], args.tokens)
            bits = store_size(work / fmt, params)["bits_per_param"]
            rows.append((fmt, q, bits, note, sec))
            print(fmt, f"ppl {q['ppl']:.2f} ({100 * (q['ppl'] / ref['ppl'] - 1):+.1f}%) bits {bits:.3f} {note} "
                  f"{sec:.0f} s", flush=True)
    print("\n| format (GPTQ, calibrated) | perplexity | vs bf16 | greedy agreement (first difference) | bits/param "
          "| mean zeros (gate_up, down) | convert s |\n|---|---:|---:|---:|---:|---|---:|")
    for fmt, q, bits, note, sec in rows:
        first = "-" if q["first"] is None else q["first"]
        print(f"| {fmt} | {q['ppl']:.2f} | {100 * (q['ppl'] / ref['ppl'] - 1):+.1f}% | {q['agree']:.3f} ({first}) | "
              f"{bits:.3f} | {note} | {'-' if sec is None else f'{sec:.0f}'} |")


if __name__ == "__main__":
    main()
