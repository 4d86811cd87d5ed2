"""Is MXFP4 worth keeping as a resident format? One gpt-oss expert's GEMV (batch 1) on CPU, four ways.

    python examples/mxfp4_gemv.py [--reps 20] [--threads 1]

  bf16           dense weights, F.linear (what store="ram" and dense stores give the engine)
  int4-g32       moe-offload's int4 records: torch.ops.aten._weight_int4pack_mm_for_cpu
  mxfp4 (tf)     the packed blocks dequantized on the fly with transformers' convert_moe_packed_tensors
                 (LUT + ldexp), then F.linear: what a resident MXFP4 slot would cost per token
  mxfp4 (ours)   the same decode with moe-offload's bit-identical `decode_mxfp4` (byte -> two values
                 gather, one multiply), then F.linear: the fastest pure-torch path we found

Shapes are gpt-oss's (20b and 120b share them): gate_up 5760 x 2880, down 2880 x 2880. Also prints the
relative weight error of requantizing the MXFP4 weights to int4-g32 (what converting a gpt-oss checkpoint to
bits="int4-g32" costs), against int4-g32 straight from the same Gaussian bf16 weights.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from offload.store.hub_formats import decode_mxfp4
from offload.formats.quant import dequantize, parse_format, qlinear, quantize, to_compute

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from hub_checkpoints import mxfp4_encode  # noqa: E402  (the tests' encoder: bf16 -> hub MXFP4)

SHAPES = {"gate_up": (5760, 2880), "down": (2880, 2880)}


def median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    g32 = parse_format("int4-g32")
    print(f"torch {torch.__version__}, {args.threads} thread(s), median of {args.reps}; ms per GEMV")
    print(f"{'matrix':8} {'bf16':>8} {'int4-g32':>9} {'mxfp4(tf)':>10} {'mxfp4(ours)':>11}   "
          f"rel.err int4-g32: of mxfp4 / of bf16")
    for name, (N, K) in SHAPES.items():
        w = torch.randn(N, K) * 0.02
        blocks, scales = mxfp4_encode(w)                                   # [N, K/32, 16], [N, K/32]
        w_mx = convert_moe_packed_tensors(blocks[None], scales[None], dtype=torch.bfloat16)[0].T.contiguous()
        x = torch.randn(1, K).bfloat16()
        parts = quantize(w_mx, g32)
        resident = to_compute(parts, g32, (N, K))
        decode = lambda: decode_mxfp4(blocks, scales, torch.bfloat16)  # noqa: E731  [K, N], transposed view
        assert torch.equal(decode().T, w_mx), "decode_mxfp4 must be bit-identical with transformers'"
        ms = {
            "bf16": median_ms(lambda: F.linear(x, w_mx), args.reps),
            "int4": median_ms(lambda: qlinear(x, resident, g32, (N, K)), args.reps),
            "tf": median_ms(lambda: F.linear(x, convert_moe_packed_tensors(blocks[None], scales[None])[0].T),
                            args.reps),
            "ours": median_ms(lambda: F.linear(x, decode().T), args.reps),
        }
        err = lambda a, b: float((a.float() - b.float()).norm() / b.float().norm())  # noqa: E731
        requant = err(dequantize(parts, g32, (N, K)), w_mx)
        direct = err(dequantize(quantize(w, g32), g32, (N, K)), w)
        print(f"{name:8} {ms['bf16']:8.2f} {ms['int4']:9.2f} {ms['tf']:10.2f} {ms['ours']:11.2f}   "
              f"{requant:.4f} / {direct:.4f}  (mxfp4 itself: {err(w_mx, w):.4f} of bf16)")


if __name__ == "__main__":
    main()
