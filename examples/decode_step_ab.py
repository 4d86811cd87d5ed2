"""Before/after of the decode step: two checkouts of moe-offload side by side, alternating rounds.

One worker process per checkout (PYTHONPATH = that checkout) loads the model once per format, every expert
resident; the driver then asks them in turn, the order flipping every round, for one round of
`offload.bench.decode_step.engine_overhead` (per MoE layer: run_layer, bare kernels; wall and thread CPU time)
and of decode speed (a manual greedy loop, and `generate()` with and without min_new_tokens). Only one
worker runs at a time. Both time with this checkout's decode_bench: the floor is the same code in both.

  python docs/benchmarks/decode_step_ab.py MODEL_DIR --base /tmp/base --new . --bits bf16,int4-g128 \\
      --store-dir /tmp/stores --rounds 9
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "offload" / "decode_bench.py"


def worker(model_dir: str, formats: list[str], store_dir: str, passes: int, tokens: int) -> None:
    import torch

    torch.set_num_threads(1)
    spec = importlib.util.spec_from_file_location("decode_bench", BENCH)
    db = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(db)
    from offload import OffloadedModel

    models, calls = {}, {}
    ids = torch.randint(3, 500, (1, 16), generator=torch.Generator().manual_seed(0))
    for fmt in formats:
        opts = {} if fmt == "bf16" else {"bits": fmt, "store": "disk", "store_dir": f"{store_dir}/{fmt}"}
        models[fmt] = OffloadedModel.from_pretrained(model_dir, cache_experts=1 << 30, **opts)
        calls[fmt] = db.capture(models[fmt], ids)
        db.generate_decode(models[fmt], ids, tokens)  # warm: every expert the decode uses is loaded
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        what, fmt = line.split()
        m = models[fmt]
        if what in ("layer", "layer-cpu"):
            clock = time.thread_time if what == "layer-cpu" else time.perf_counter
            r = db.engine_overhead(m, calls[fmt], rounds=1, passes=passes, clock=clock)
            res = {"engine_us": r["engine_us"], "floor_us": r["floor_us"], "bit_equal": r["bit_equal"]}
        else:
            manual, toks = db.manual_decode(m, ids, tokens)
            manual_cpu, _ = db.manual_decode(m, ids, tokens, clock=time.thread_time)
            gen, gtoks = db.generate_decode(m, ids, tokens)
            plain, _ = db.generate_decode(m, ids, tokens, exact=False)
            res = {"manual_s": manual, "manual_cpu_s": manual_cpu, "generate_s": gen, "generate_plain_s": plain,
                   "tokens": toks, "generate_tokens": gtoks}
        print(json.dumps(res), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir")
    ap.add_argument("--base", required=True, help="checkout measured as 'before'")
    ap.add_argument("--new", required=True, help="checkout measured as 'after'")
    ap.add_argument("--bits", default="bf16,int4-g128")
    ap.add_argument("--store-dir", required=True, help="quantized stores, one subfolder per format")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--passes", type=int, default=40, help="passes over all MoE layers per layer round")
    ap.add_argument("--tokens", type=int, default=32, help="decoded tokens per decode round")
    ap.add_argument("--json", help="write every sample here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    formats = [f.strip() for f in a.bits.split(",") if f.strip()]
    if a.worker:
        return worker(a.model_dir, formats, a.store_dir, a.passes, a.tokens)
    procs = {}
    for name, checkout in (("before", a.base), ("after", a.new)):
        env = {**os.environ, "PYTHONPATH": str(Path(checkout).resolve())}
        argv = [sys.executable, __file__, a.model_dir, "--worker", "--base", a.base, "--new", a.new, "--bits", a.bits,
                "--store-dir", a.store_dir, "--passes", str(a.passes), "--tokens", str(a.tokens)]
        procs[name] = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    ask = lambda name, cmd: (procs[name].stdin.write(cmd + "\n"), procs[name].stdin.flush(),  # noqa: E731
                             json.loads(procs[name].stdout.readline()))[-1]
    for p in procs.values():
        assert json.loads(p.stdout.readline())["ready"]
    samples: dict = {}
    for r in range(a.rounds):
        order = ("before", "after") if r % 2 == 0 else ("after", "before")
        for fmt in formats:
            for what in ("layer", "layer-cpu", "decode"):
                for name in order:
                    samples.setdefault((fmt, what, name), []).append(ask(name, f"{what} {fmt}"))
        print(f"round {r + 1}/{a.rounds} done", file=sys.stderr, flush=True)
    for p in procs.values():
        p.stdin.close()
        p.wait()
    med = lambda rows, k: statistics.median(x[k] for x in rows)  # noqa: E731
    print(f"{a.model_dir}: medians of {a.rounds} alternating rounds")
    for fmt in formats:
        for what, clock in (("layer", "wall"), ("layer-cpu", "thread CPU")):
            lb, la = samples[(fmt, what, "before")], samples[(fmt, what, "after")]
            ob = statistics.median(x["engine_us"] - x["floor_us"] for x in lb)
            oa = statistics.median(x["engine_us"] - x["floor_us"] for x in la)
            print(f"  {fmt}: per MoE layer ({clock} time) run_layer {med(lb, 'engine_us'):.1f} -> "
                  f"{med(la, 'engine_us'):.1f} us, bare kernels {med(lb, 'floor_us'):.1f} / {med(la, 'floor_us'):.1f} "
                  f"us, engine overhead {ob:.1f} -> {oa:.1f} us; bit-equal to the floor: "
                  f"{all(x['bit_equal'] for x in lb + la)}")
        db, da = samples[(fmt, "decode", "before")], samples[(fmt, "decode", "after")]
        for key, label in (("manual_s", "manual loop"), ("manual_cpu_s", "manual loop, thread CPU time"),
                           ("generate_s", "generate(min_new_tokens)"), ("generate_plain_s", "generate()")):
            ratios = [b[key] / x[key] for b, x in zip(db, da)]
            print(f"  {fmt}: {label} {1 / med(db, key):.2f} -> {1 / med(da, key):.2f} tok/s, after/before "
                  f"{statistics.median(ratios):.3f}x (paired rounds, min {min(ratios):.3f}, max {max(ratios):.3f})")
        same = all(x["tokens"] == db[0]["tokens"] and x["generate_tokens"] == db[0]["generate_tokens"] for x in db + da)
        print(f"  {fmt}: the same tokens before and after, every round: {same}")
    if a.json:
        Path(a.json).write_text(json.dumps({"|".join(k): v for k, v in samples.items()}, indent=1))


if __name__ == "__main__":
    main()
