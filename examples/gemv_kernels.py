"""Which batch-1 CPU GEMV does torch ship that beats the int4/int8 expert kernels? One Mixtral-0.8B expert
(gate_up 7168 x 1024, then down 1024 x 3584) at batch 1, every path timed in interleaved rounds (medians).

    python examples/gemv_kernels.py [--rounds 7] [--reps 50] [--threads 1] [--no-compile]

Paths (x is one bf16 token; weights Gaussian, std 0.02):
  fp32 F.linear            the reference's compute, dense fp32 weights (MKL sgemv)
  bf16 F.linear            dense bf16 (oneDNN; AMX bf16 tiles where the CPU has them)
  int8 (today)             moe-offload's int8 kind: aten._weight_int8pack_mm (bf16 x, int8 W, per-row scale)
  int4-g128 (today)        moe-offload's int4 kind: aten._weight_int4pack_mm_for_cpu
  dyn-q <engine>           quantized::linear_dynamic (x quantized per tensor to uint8 inside, int8 W per row)
                           under torch.backends.quantized.engine = fbgemm / x86 / onednn / qnnpack
  ao dynamic Linear        torch.ao.nn.quantized.dynamic.Linear (the module over the same op, default engine)
  onednn qlinear           onednn::qlinear_pointwise (inductor's x86 quantizer op): x quantized per tensor to
                           uint8 here (timed), int8 W per row, bf16 out (VNNI / AMX int8 where present)
  _int_mm                  aten._int_mm: x quantized per tensor to int8 (timed), int32 accumulate, rescale
  compiled int8            torch.compile of (x @ W_int8.to(bf16).T) * scale: inductor's fused CPU kernel

Also the one-off cost of linear_prepack per matrix (the packed weight is an opaque object, not a tensor: a
slot would have to repack it on every load). The error column is ||y - y_ref|| / ||y_ref||, with y_ref the same token through that path's own dequantized
weights in fp32: what the kernel (and any activation quantization) adds on top of the weight format.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from offload.formats.quant import dequantize, parse_format, qlinear, quantize, to_compute

SHAPES = {"gate_up": (7168, 1024), "down": (1024, 3584)}
Path = Callable[[torch.Tensor], torch.Tensor]   # one token [1, K] bf16 -> [1, N]
PREPACK_MS: dict[str, list[float]] = {}          # linear_prepack's cost per matrix: what a load would pay


def _q_per_row(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output row, the int8 kind's quantizer (bf16 scales)."""
    p = quantize(w, parse_format("int8"))
    return p["qweight"], p["scales"]


def _q_act_u8(x: torch.Tensor) -> tuple[torch.Tensor, float, int]:
    """Per-tensor asymmetric uint8 activation quantization (what linear_dynamic does internally)."""
    xf = x.float()
    lo, hi = min(float(xf.min()), 0.0), max(float(xf.max()), 0.0)
    scale = max((hi - lo) / 255, 1e-12)
    zp = int(round(-lo / scale))
    return torch.clamp(torch.round(xf / scale) + zp, 0, 255).to(torch.uint8), scale, zp


def paths(N: int, K: int, w: torch.Tensor, compile_: bool) -> dict[str, tuple[Path, torch.Tensor]]:
    """name -> (the call, the dequantized weight its reference uses)."""
    out: dict[str, tuple[Path, torch.Tensor]] = {}
    out["fp32 F.linear"] = (lambda x, w=w: F.linear(x.float(), w), w)
    wb = w.bfloat16()
    out["bf16 F.linear"] = (lambda x: F.linear(x, wb), wb.float())
    for name, fmt in (("int8 (today)", parse_format("int8")), ("int4-g128 (today)", parse_format("int4-g128"))):
        parts = quantize(w, fmt)
        res = to_compute(parts, fmt, (N, K))
        out[name] = (lambda x, r=res, f=fmt: qlinear(x, r, f, (N, K)), dequantize(parts, fmt, (N, K)))
    q, s = _q_per_row(w)
    wdq = q.float() * s.float()[:, None]
    qw = torch.quantize_per_channel(wdq, s.float(), torch.zeros(N, dtype=torch.long), 0, torch.qint8)
    for eng in ("fbgemm", "x86", "onednn", "qnnpack"):
        torch.backends.quantized.engine = eng
        t0 = time.perf_counter()
        packed = torch.ops.quantized.linear_prepack(qw, None)
        PREPACK_MS.setdefault(eng, []).append((time.perf_counter() - t0) * 1e3)

        def dyn(x, p=packed, e=eng):
            torch.backends.quantized.engine = e
            return torch.ops.quantized.linear_dynamic(x.float(), p)
        out[f"dyn-q {eng}"] = (dyn, wdq)
    torch.backends.quantized.engine = "x86"
    mod = torch.ao.nn.quantized.dynamic.Linear(K, N, bias_=False, dtype=torch.qint8)
    mod.set_weight_bias(qw, None)
    out["ao dynamic Linear (x86)"] = (lambda x: mod(x.float()), wdq)

    qw_onednn = torch.ops.onednn.qlinear_prepack(q, [1, K])
    ws, wz = s.float(), torch.zeros(N, dtype=torch.long)

    def onednn(x):
        xq, xs, xz = _q_act_u8(x)
        return torch.ops.onednn.qlinear_pointwise(xq, xs, xz, qw_onednn, ws, wz, None, 1.0, 0, torch.bfloat16,
                                                  "none", [], "")
    out["onednn qlinear (u8 x)"] = (onednn, wdq)
    qt = q.t().contiguous()
    sf = s.float()

    def int_mm(x):
        xf = x.float()
        xs = xf.abs().max().clamp(min=1e-12) / 127
        xq = torch.round(xf / xs).clamp(-127, 127).to(torch.int8)
        xq = torch.cat([xq, xq.new_zeros(16, K)])  # _int_mm wants more than 16 rows
        return (torch._int_mm(xq, qt)[:1].float() * (xs * sf)).bfloat16()
    out["_int_mm (i8 x)"] = (int_mm, wdq)
    if compile_:
        sb = s.bfloat16()
        fn = torch.compile(lambda x, q, s: (x @ q.to(torch.bfloat16).t()) * s, dynamic=False)
        out["compiled int8"] = (lambda x: fn(x, q, sb), wdq)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, cpu capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{args.threads} thread(s), load average {os.getloadavg()[0]:.2f}; us per GEMV, median of "
          f"{args.rounds} rounds x {args.reps} calls")
    table: dict[str, dict[str, tuple[float, float]]] = {}
    for mat, (N, K) in SHAPES.items():
        w = torch.randn(N, K) * 0.02
        x = torch.randn(1, K).bfloat16()
        ps = paths(N, K, w, not args.no_compile)
        errs = {}
        for name, (fn, wdq) in ps.items():
            ref = F.linear(x.float(), wdq.float())
            y = fn(x).float()
            errs[name] = float((y - ref).norm() / ref.norm())
            for _ in range(5):
                fn(x)
        times: dict[str, list[float]] = {n: [] for n in ps}
        for r in range(args.rounds):
            order = list(ps) if r % 2 == 0 else list(reversed(ps))
            for name in order:
                fn = ps[name][0]
                t0 = time.perf_counter()
                for _ in range(args.reps):
                    fn(x)
                times[name].append((time.perf_counter() - t0) / args.reps * 1e6)
        for name in ps:
            table.setdefault(name, {})[mat] = (statistics.median(times[name]), errs[name])
    base = sum(v[0] for v in table["int4-g128 (today)"].values())
    print("\n| path | gate_up 7168x1024 us | down 1024x3584 us | expert us | vs int4 today | rel. error "
          "gate_up / down |")
    print("|---|---:|---:|---:|---:|---|")
    for name, row in table.items():
        tot = row["gate_up"][0] + row["down"][0]
        print(f"| {name} | {row['gate_up'][0]:.0f} | {row['down'][0]:.0f} | {tot:.0f} | {tot / base:.2f} | "
              f"{row['gate_up'][1]:.1e} / {row['down'][1]:.1e} |")
    print("\nquantized::linear_prepack per matrix (gate_up, down), ms: " + "; ".join(
        f"{e} {', '.join(f'{t:.0f}' for t in ts)}" for e, ts in PREPACK_MS.items()))
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
