"""Weight-only conversion speed per expert format, this tree against an earlier commit, with a per-stage breakdown.

    python examples/convert_speed.py [--model demo|mixtral|DIR] [--baseline REV] [--repeats 3] [--experts 1]
    python examples/convert_speed.py --calibration      # the calibration pass's tokens/s on the demo

`--model mixtral` builds a synthetic checkpoint in a temporary directory: Mixtral-8x7B expert shapes (w1/w3
[14336, 4096], w2 [4096, 14336]), `--experts` of them in one layer, Gaussian bf16 (std 0.02).

Each round converts the checkpoint's experts once per format and per tree (`offload.store.convert.convert`
into a fresh temporary store, progress off, `torch.set_num_threads(1)`), each conversion in its own
subprocess whose PYTHONPATH is that tree (the baseline is `git archive REV`), alternating the trees' order
so drift hits both. A conversion is timed after a first, untimed one in the same process, which builds what a
process builds once (the compiled clip search); the first one's extra CPU seconds are a column of their own.
MB/s are of checkpoint expert bytes (bf16), medians over rounds. "same bytes" compares the data files with the
baseline's: a `-search` or `-minmax` format against the baseline's plain one (the same search only for baselines
from before clip="fast", such as 731978a).
MB/s are per CPU-second of the converting process (`time.process_time`: on a shared, oversubscribed VM the
wall clock mostly measures waiting for a core), wall-clock MB/s beside them. Stages are timed (CPU seconds)
by wrapping the converter's calls; "write" is what remains (write, fsync, journal, the loop).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "offload" / "demo_model"
FORMATS = ("int8", "int4-g32", "int4-g32-search", "int4-g64", "int4-g128", "int4-g128-search", "int4-adaptive",
           "int3-g32", "int3-g32-search", "int2-g32", "int2-g32-search", "ternary", "ternary-z80")
STAGES = ("read", "quantize", "pack codes", "record", "compress", "checksum", "write")


def build_mixtral(out: Path, experts: int) -> Path:
    """A one-layer Mixtral checkpoint with 8x7B expert shapes: config.json plus the experts' safetensors."""
    import torch
    from safetensors.torch import save_file
    from transformers import MixtralConfig

    MixtralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=1, num_local_experts=experts,
                  num_experts_per_tok=min(2, experts), num_attention_heads=32, num_key_value_heads=8,
                  vocab_size=128).save_pretrained(out)
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for e in range(experts):
        for name, shape in (("w1", (14336, 4096)), ("w3", (14336, 4096)), ("w2", (4096, 14336))):
            tensors[f"model.layers.0.block_sparse_moe.experts.{e}.{name}.weight"] = \
                (torch.randn(shape, generator=g) * 0.02).bfloat16()
    save_file(tensors, str(out / "model.safetensors"))
    return out


def worker(model_dir: Path, fmt: str, out: Path) -> dict:
    """One timed conversion in this process (whichever tree PYTHONPATH names): seconds, bytes, digest, stages."""
    import torch

    from offload.config import OffloadConfig
    from offload.formats import kinds
    from offload.store import convert as conv
    from offload.store.layout import ExpertLayout
    from offload.store.source import open_checkpoint

    torch.set_num_threads(1)
    cfg = OffloadConfig(store="disk", store_dir=str(out), bits=fmt)
    _hf, arch, source, _k = open_checkpoint(model_dir, cfg.dtype)
    codec = conv.codec_for(cfg, source, arch)
    spent = dict.fromkeys(STAGES, 0.0)

    def timed(stage, fn):
        def call(*a, **kw):
            t0 = time.process_time()
            try:
                return fn(*a, **kw)
            finally:
                spent[stage] += time.process_time() - t0
        return call

    source.read, source.read_into = timed("read", source.read), timed("read", source.read_into)
    codec.encode = timed("quantize", codec.encode)
    for kind in {type(k) for k in kinds.KINDS.values()}:
        if "pack" in vars(kind):
            kind.pack = timed("pack codes", vars(kind)["pack"])
    ExpertLayout.pack = timed("record", ExpertLayout.pack)
    conv.compress, conv.checksum = timed("compress", conv.compress), timed("checksum", conv.checksum)
    c0 = time.process_time()  # a first conversion builds what is built once per process (compiled searches)
    conv.convert(source, out.with_name(out.name + "-first"), {"format": fmt}, codec, progress=False)
    first = time.process_time() - c0
    spent.update(dict.fromkeys(STAGES, 0.0))
    t0, c0 = time.perf_counter(), time.process_time()
    conv.convert(source, out, {"format": fmt}, codec, progress=False)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    spent["quantize"] -= spent["pack codes"]  # encode's own time, less the packing inside it
    spent["write"] = cpu - sum(spent.values())
    digest = hashlib.sha256((out / "experts.bin").read_bytes()).hexdigest()
    return {"seconds": wall, "cpu": cpu, "bytes": len(source.keys()) * source.layout.nbytes, "digest": digest,
            "stages": spent, "first extra": first - cpu}


def run_worker(tree: Path, model_dir: Path, fmt: str, out: Path) -> dict | None:
    """One conversion in a subprocess on `tree`; None where the format's group size does not fit the experts."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, __file__, "--worker", str(model_dir), fmt, str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode and "divisible by its group size" in proc.stderr:
        return None
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.splitlines()[-1])


def plain(fmt: str) -> str:
    """The format without its clip suffix: what a `-search` or `-minmax` row is compared against."""
    return fmt.removesuffix("-search").removesuffix("-minmax")


def compare(model_dir: Path, baseline: Path, repeats: int, tmp: Path, formats: list[str]) -> None:
    trees = {"before": baseline, "after": ROOT}
    results: dict = {}
    for r in range(repeats):
        for fmt in list(formats):
            for name in (trees if r % 2 == 0 else reversed(list(trees))):
                if name == "before" and plain(fmt) != fmt:
                    continue  # measured against the baseline's plain format
                out = tmp / f"{r}-{name}-{fmt}"
                got = run_worker(trees[name], model_dir, fmt, out)
                subprocess.run(["rm", "-rf", str(out), f"{out}-first"], check=True)
                if got is None:
                    formats.remove(fmt)
                    break
                results.setdefault((name, fmt), []).append(got)
        print_table(model_dir, results, formats, r + 1)


def print_table(model_dir: Path, results: dict, formats: list[str], rounds: int) -> None:
    """The table over the rounds so far (printed after each, so a long run's partial results are kept)."""
    nbytes = results["after", formats[0]][0]["bytes"]
    print(f"\n{model_dir.name}: {nbytes / 1e6:.0f} MB of bf16 experts, 1 thread, median of {rounds}; MB/s per "
          f"CPU-second of the converting process (wall-clock MB/s in brackets); stages of 'after' in CPU seconds\n")
    print("| format | MB/s before | MB/s after | speed-up | same bytes as before | first conversion's extra s | "
          + " | ".join(f"{s} s" for s in STAGES) + " |")
    print("|---|---:|---:|---:|---|---:|" + "---:|" * len(STAGES))
    for fmt in formats:
        after = results["after", fmt]
        base = results["before", plain(fmt)]
        cpu = [nbytes / 1e6 / statistics.median(x["cpu"] for x in rs) for rs in (base, after)]
        wall = [nbytes / 1e6 / statistics.median(x["seconds"] for x in rs) for rs in (base, after)]
        same = "yes" if base[0]["digest"] == after[0]["digest"] else "no"
        stages = [statistics.median(x["stages"][s] for x in after) for s in STAGES]
        first = statistics.median(x["first extra"] for x in after)
        cells = [f"{cpu[0]:.0f} ({wall[0]:.0f})", f"{cpu[1]:.0f} ({wall[1]:.0f})", f"{cpu[1] / cpu[0]:.2f}x", same,
                 f"{first:.1f}"]
        print(f"| {fmt} | " + " | ".join(cells + [f"{v:.3f}" for v in stages]) + " |")
    determinism = {fmt: len({x["digest"] for x in results["after", fmt]}) == 1 for fmt in formats}
    print(f"\nevery round's store byte-identical: {all(determinism.values())}", flush=True)


def calibration_pass(repeats: int) -> None:
    """Tokens/s of `offload.store.calibrate.collect` on the demo, and where its time goes."""
    import torch
    from torch.profiler import profile

    from offload.store import calibrate
    from offload.store.source import open_checkpoint

    torch.set_num_threads(1)
    _hf, _arch, source, _k = open_checkpoint(DEMO, torch.bfloat16)
    text = DEMO / "calibration.txt"
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        stats = calibrate.collect(source, text, torch.bfloat16, progress=False)
        seconds.append(time.perf_counter() - t0)
    tokens = sum(s["tokens"] for s in stats.values()) // 2  # top-2: every token reaches two experts per layer
    tokens //= len(source.layers)
    print(f"calibration pass: {tokens} tokens, median {statistics.median(seconds):.1f} s of {repeats}, "
          f"{tokens / statistics.median(seconds):.0f} tokens/s")
    with profile() as p:
        calibrate.collect(source, text, torch.bfloat16, progress=False)
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        print(json.dumps(worker(Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4]))))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo", help="demo, mixtral (synthetic 8x7B expert shapes) or a checkpoint dir")
    ap.add_argument("--baseline", default="47b9809", help="git revision to compare against")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--experts", type=int, default=1, help="experts in the synthetic mixtral checkpoint")
    ap.add_argument("--formats", default=",".join(FORMATS), help="comma-separated formats to convert")
    ap.add_argument("--calibration", action="store_true", help="time the calibration pass instead")
    args = ap.parse_args()
    if args.calibration:
        calibration_pass(args.repeats)
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        baseline = tmp / "baseline"
        baseline.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.baseline, "offload", "cache", "predictors"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(baseline)], input=archive, check=True)
        model = {"demo": DEMO}.get(args.model) or (build_mixtral(tmp / "mixtral", args.experts)
                                                   if args.model == "mixtral" else Path(args.model))
        compare(model, baseline, args.repeats, tmp, args.formats.split(","))


if __name__ == "__main__":
    main()
