"""GPTQ for ternary-zNN: calibration loss per mask block and damping, on a few of one model's experts.

    python examples/sparse_ternary_settings.py [MODEL_DIR] [--calibration FILE] [--experts 0,5]

Collects the calibration statistics (offload/store/calibrate.py), then for ternary-z80 and ternary-z90 and
each (mask block, damping) codes the gate_up and down matrices of --experts in every layer and prints GPTQ's
objective summed over them, tr((W - Q) H (W - Q)^T), relative to the weight-only codes. One thread.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from offload.formats import gptq
from offload.formats.quant import dequantize, parse_format, quantize
from offload.formats.record import MATRICES
from offload.store import calibrate
from offload.store.source import open_checkpoint

DEMO = Path(__file__).resolve().parents[1] / "offload" / "demo_model"
GRID = [("fixed", 32, 0.01), ("joint", 128, 0.01), ("joint", 32, 0.01), ("joint", 8, 0.01), ("joint", 128, 0.1),
        ("joint", 64, 0.1), ("joint", 16, 0.1), ("joint", 32, 0.1), ("joint", 32, 0.3), ("joint", 32, 1.0)]


def loss(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    return float(torch.einsum("nk,kl,nl->", W - Q, H, W - Q))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", nargs="?", type=Path, default=DEMO)
    ap.add_argument("--calibration", type=Path, default=DEMO / "calibration.txt")
    ap.add_argument("--experts", default="0,5")
    args = ap.parse_args()
    torch.set_num_threads(1)
    _, arch, source, _ = open_checkpoint(args.model_dir, torch.bfloat16)
    stats = calibrate.collect(source, args.calibration, torch.bfloat16, progress=False)
    keys = [(layer, int(e)) for layer in source.layers for e in args.experts.split(",")]
    rows = {}
    for name in ("ternary-z80", "ternary-z90"):
        fmt = parse_format(name)
        total = dict.fromkeys(["weights", *GRID], 0.0)
        for key in keys:
            dense = source.read(key)
            for m in MATRICES:
                W = (dense[m].T if arch.transposed else dense[m]).float()
                H = stats[key][m]
                total["weights"] += loss(W, dequantize(quantize(W, fmt), fmt, W.shape), H)
                for support, block, damping in GRID:
                    gptq.MASK_BLOCK = block
                    parts = gptq.gptq(W, H, fmt, damping, support)
                    total[(support, block, damping)] += loss(W, dequantize(parts, fmt, W.shape), H)
        rows[name] = {k: v / total["weights"] for k, v in total.items() if k != "weights"}
    print("| support | mask block | damping | ternary-z80 | ternary-z90 |\n|---|---:|---:|---:|---:|")
    for support, block, damping in GRID:
        print(f"| {support} | {block} | {damping} | {rows['ternary-z80'][(support, block, damping)]:.3f} | "
              f"{rows['ternary-z90'][(support, block, damping)]:.3f} |")


if __name__ == "__main__":
    main()
