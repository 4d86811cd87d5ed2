"""Weight-only conversion speed per expert format: this tree's clip search against an earlier commit's.

    python examples/convert_speed.py [MODEL_DIR] [--baseline REV] [--repeats 5]

MODEL_DIR defaults to the shipped demo model. Each round converts the checkpoint's experts once per format
and per implementation (`offload.store.convert.convert` into a fresh temporary store, progress off, one
thread), alternating the two so drift hits both; the baseline is `offload/formats/groupwise.py` as of REV,
loaded from git and swapped in for the int4/int3/int2 quantizer (every other step is this tree's). MB/s are
of checkpoint expert bytes (bf16), medians over rounds. The codes are the same (tests/formats/test_groupwise.py);
this prints whether the stores' bytes are too. A second table times the quantizer alone on one Gaussian matrix
of `--matrix` shape (default 2048x4096, a real model's expert size: the demo's 576x256 ones are small enough
for per-operation overhead to matter).
"""
from __future__ import annotations

import argparse
import hashlib
import statistics
import subprocess
import tempfile
import time
import types
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from offload.config import OffloadConfig
from offload.formats import groupwise, kinds
from offload.store.convert import codec_for, convert
from offload.store.source import open_checkpoint

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "offload" / "demo_model"
FORMATS = ("int8", "int4-g32", "int4-adaptive", "int3-g32", "int2-g32", "ternary")


def baseline_quantizer(rev: str):
    """`quantize_groups` as `offload/formats/groupwise.py` had it at git revision `rev`."""
    text = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:offload/formats/groupwise.py"],
                          capture_output=True, text=True, check=True).stdout
    module = types.ModuleType("groupwise_baseline")
    exec(compile(text, f"{rev}:groupwise.py", "exec"), module.__dict__)
    return module.quantize_groups


def convert_once(model_dir: Path, fmt: str, out: Path) -> tuple[float, int, str]:
    """(seconds, checkpoint expert bytes, digest of the data file) of one conversion into `out`."""
    cfg = OffloadConfig(store="disk", store_dir=str(out), bits=fmt)
    _hf, arch, source, _k = open_checkpoint(model_dir, cfg.dtype)
    codec = codec_for(cfg, source, arch)
    t0 = time.perf_counter()
    convert(source, out, {"format": fmt}, codec, progress=False)
    dt = time.perf_counter() - t0
    digest = hashlib.sha256((out / "experts.bin").read_bytes()).hexdigest()
    return dt, len(source.keys()) * source.layout.nbytes, digest


def quantizer_alone(impls: dict, shape: tuple[int, int], repeats: int) -> Table:
    """MB/s (bf16 bytes) of each implementation of `quantize_groups` on one matrix, alternating, medians."""
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    cases = [(bits, G) for bits in (4, 3, 2) for G in (128, 32)]
    seconds = {(c, name): [] for c in cases for name in impls}
    for r in range(repeats):
        for c in cases:
            for name, fn in (impls.items() if r % 2 == 0 else reversed(impls.items())):
                t0 = time.perf_counter()
                fn(w, *c)
                seconds[c, name].append(time.perf_counter() - t0)
    table = Table(title=f"quantize_groups alone, Gaussian {shape[0]}x{shape[1]}, 1 thread, median of {repeats}")
    table.add_column("format")
    for name in impls:
        table.add_column(f"MB/s {name}", justify="right")
    table.add_column("speed-up", justify="right")
    for bits, G in cases:
        mbs = [2 * w.numel() / 1e6 / statistics.median(seconds[(bits, G), name]) for name in impls]
        table.add_row(f"int{bits}-g{G}", *(f"{v:.0f}" for v in mbs), f"{mbs[1] / mbs[0]:.2f}x")
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", nargs="?", type=Path, default=DEMO)
    ap.add_argument("--baseline", default="1f559fa", help="git revision of the clip search to compare against")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--matrix", default="2048x4096", help="NxK of the matrix the quantizer alone is timed on")
    args = ap.parse_args()
    torch.set_num_threads(1)
    impls = {args.baseline: baseline_quantizer(args.baseline), "this tree": groupwise.quantize_groups}
    seconds = {(f, i): [] for f in FORMATS for i in impls}
    digests: dict[tuple[str, str], str] = {}
    nbytes = 0
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for fmt in FORMATS:
                for name, fn in (impls.items() if r % 2 == 0 else reversed(impls.items())):
                    kinds.quantize_groups = fn
                    dt, nbytes, digests[fmt, name] = convert_once(args.model_dir, fmt, Path(tmp) / f"{r}-{fmt}-{len(name)}")
                    seconds[fmt, name].append(dt)
    kinds.quantize_groups = impls["this tree"]
    table = Table(title=f"weight-only conversion of {args.model_dir.name}'s experts ({nbytes / 1e6:.0f} MB bf16), "
                        f"1 thread, median of {args.repeats}")
    table.add_column("format")
    for name in impls:
        table.add_column(f"MB/s {name}", justify="right")
    table.add_column("speed-up", justify="right")
    table.add_column("same store bytes")
    for fmt in FORMATS:
        mbs = [nbytes / 1e6 / statistics.median(seconds[fmt, name]) for name in impls]
        same = len({digests[fmt, name] for name in impls}) == 1
        table.add_row(fmt, *(f"{v:.0f}" for v in mbs), f"{mbs[1] / mbs[0]:.2f}x", "yes" if same else "NO")
    Console().print(table)
    Console().print(quantizer_alone(impls, tuple(int(d) for d in args.matrix.split("x")), args.repeats))


if __name__ == "__main__":
    main()
