"""Which batch-1 CPU GEMV does torch ship that beats the int4/int8 expert kernels? One Mixtral-0.8B expert
(gate_up 7168 x 1024, then down 1024 x 3584) at batch 1, every path timed in interleaved rounds (medians).

    python examples/gemv_kernels.py [--rounds 7] [--reps 50] [--threads 1] [--no-compile]
    python examples/gemv_kernels.py --token [--rounds 7]

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
  ort int4 / int8 (aN)     onnxruntime's MatMulNBits (com.microsoft) on the same int4-g128 / int8 codes, one
                           session per matrix (weights as initializers, prepacked by MLAS), accuracy_level N:
                           4 = int8 activations per block (VNNI), 0 = fp32; int4's float zero point is added as
                           (x summed per group) @ zero, the kind's w = (q - 8) * scale + zero. Only where
                           `onnx` and `onnxruntime` are installed (not moe-offload dependencies).

--token streams one decode token's worth of distinct matrices of the random 0.8B Mixtral (8 layers of
q/k/v/o and two experts' gate_up/down, the lm_head: 110 MiB at int4) the way a decode step reads them from
DRAM (one matrix in isolation stays in the L2/L3 cache and flatters every kernel), through int4/int8 today,
fbgemm's dynamic int8 and ORT ("bare": the session alone; "wrapped": with the bf16 conversions and int4's
zero term a caller needs), next to the machine's ceiling (an fp32 sum over 256 MiB). Each path runs in its
own process, and its RSS column is what its weights added there (ORT keeps its own copy of every
initializer next to the prepacked form).

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


def _ort_session(N: int, K: int, bits: int, block: int, codes, scales, accuracy: int):
    """One MatMulNBits session for W [N, K]: `codes` uint8 [N, K/block, block*bits/8], `scales` fp32 [N*K/block]
    (no zero points: 8 for int4, 128 for int8)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    node = helper.make_node("MatMulNBits", ["A", "B", "S"], ["Y"], domain="com.microsoft", K=K, N=N, bits=bits,
                            block_size=block, accuracy_level=accuracy)
    graph = helper.make_graph([node], "gemv", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", K])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", N])],
                              [numpy_helper.from_array(codes, "B"), numpy_helper.from_array(scales, "S")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = torch.get_num_threads(), 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def ort_paths(N: int, K: int, w: torch.Tensor, accuracies=(4, 0)) -> dict[str, tuple[Path, torch.Tensor]]:
    """MatMulNBits on the int4-g128 and int8 kinds' own codes (so the same dequantized weights)."""
    out: dict[str, tuple[Path, torch.Tensor]] = {}
    f4 = parse_format("int4-g128")
    p4 = quantize(w, f4)
    res = to_compute(p4, f4, (N, K))
    G = K // res["qsz"].shape[0]
    q = f4.kind_object.codes(f4, p4, N, K).view(N, K // G, G)
    b4 = (q[..., 0::2] | q[..., 1::2] << 4).contiguous().numpy()
    s4 = res["qsz"][:, :, 0].float().t().contiguous().view(-1).numpy()
    zero = res["qsz"][:, :, 1].float().contiguous()                      # [K/G, N]
    f8 = parse_format("int8")
    p8 = quantize(w, f8)
    b8 = (p8["qweight"].to(torch.int16) + 128).to(torch.uint8).view(N, K // 128, 128).numpy()
    s8 = p8["scales"].float()[:, None].expand(N, K // 128).contiguous().view(-1).numpy()
    kinds = ((4, b4, s4, dequantize(p4, f4, (N, K))), (8, b8, s8, dequantize(p8, f8, (N, K))))
    for acc in accuracies:
        for bits, codes, scales, wdq in kinds:
            sess = _ort_session(N, K, bits, G if bits == 4 else 128, codes, scales, acc)

            def run(x, sess=sess, bits=bits):
                xf = x.float().contiguous()
                y = torch.from_numpy(sess.run(None, {"A": xf.numpy()})[0])
                return y.addmm_(xf.view(-1, K // G, G).sum(-1), zero) if bits == 4 else y
            out[f"ort int{bits} (a{acc})"] = (run, wdq)
    return out


TOKEN_SHAPES = [s for _ in range(8) for s in ((1024, 1024), (256, 1024), (256, 1024), (1024, 1024), (7168, 1024),
                                               (1024, 3584), (7168, 1024), (1024, 3584))] + [(32000, 1024)]


def token(rounds: int) -> None:
    """A decode token's distinct matrices, streamed from DRAM: each path in its own process (its RSS is its own)."""
    import subprocess
    import sys
    codes_mib = sum(N * K for N, K in TOKEN_SHAPES) / 2**21
    ceiling = _sum_speed()
    print(f"one token: {len(TOKEN_SHAPES)} matrices, {codes_mib:.0f} MiB of int4 codes; fp32 sum over 256 MiB: "
          f"{ceiling / 1e9:.1f} GB/s, so int4 codes at that speed take {codes_mib * 2**20 / ceiling * 1e3:.2f} ms")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # freed weights go back to the OS: RSS deltas hold
    rows = []
    for name in TOKEN_PATHS:
        out = subprocess.run([sys.executable, __file__, "--token-path", name, "--rounds", str(rounds),
                              "--threads", str(torch.get_num_threads())], capture_output=True, text=True, env=env)
        if out.returncode:
            print(f"{name}: exit {out.returncode}: {(out.stderr.strip().splitlines() or [''])[-1]}")
            continue
        ms, mib = map(float, out.stdout.split())
        rows.append((name, ms, mib))
    base = rows[0][1]
    print("\n| path | ms per token | vs int4 today | RSS of the weights MiB |\n|---|---:|---:|---:|")
    for name, ms, mib in rows:
        print(f"| {name} | {ms:.2f} | {ms / base:.2f} | {mib:.0f} |")


def _sum_speed() -> float:
    """Bytes/s of an fp32 sum over 256 MiB: how fast one core streams DRAM (the GEMVs' ceiling)."""
    big = torch.randn(1 << 26)
    return big.nbytes / statistics.median(_clock(big.sum, 7))


def token_path(name: str, rounds: int) -> None:
    """One path over TOKEN_SHAPES: prints ms per token and the RSS its weights added."""
    import gc

    import psutil
    gc.collect()
    r0 = psutil.Process().memory_info().rss
    calls = [TOKEN_PATHS[name](N, K) for N, K in TOKEN_SHAPES]
    gc.collect()
    mib = (psutil.Process().memory_info().rss - r0) / 2**20
    ms = statistics.median(_clock(lambda: [c() for c in calls], rounds)) * 1e3
    print(ms, mib)


def _clock(fn: Callable[[], object], rounds: int) -> list[float]:
    fn()
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _today(fmt_name: str):
    """The kind's compute form filled with random bytes (speed only; no fp32 temporaries)."""
    from offload.formats.quant import compute_layout
    fmt = parse_format(fmt_name)

    def build(N, K):
        res = {n: torch.randint(0, 256, s, dtype=torch.uint8).view(dt) if dt.itemsize == 1 else
               torch.rand(s).mul_(0.01).to(dt) for n, s, dt in compute_layout(fmt, (N, K))}
        x = torch.randn(1, K).bfloat16()
        return lambda: qlinear(x, res, fmt, (N, K))
    return build


def _ort(bits: int, wrapped: bool):
    """MatMulNBits on random codes; `wrapped`: as moe-offload would call it (bf16 in, float zero term for int4)."""
    import numpy as np

    def build(N, K):
        G = 128
        codes = np.random.randint(0, 256, (N, K // G, G * bits // 8), dtype=np.uint8)
        sess = _ort_session(N, K, bits, G, codes, np.random.rand(N * K // G).astype(np.float32) * 0.01, 4)
        del codes
        x = torch.randn(1, K).bfloat16()
        xf = x.float()
        zero = torch.randn(K // G, N) if bits == 4 and wrapped else None
        io = sess.io_binding()
        y = torch.empty(1, N)
        io.bind_output("Y", "cpu", 0, np.float32, [1, N], y.data_ptr())
        io.bind_input("A", "cpu", 0, np.float32, [1, K], xf.data_ptr())
        if not wrapped:
            return lambda keep=(xf, y): sess.run_with_iobinding(io)

        def call():
            a = x.float()
            io.bind_input("A", "cpu", 0, np.float32, [1, K], a.data_ptr())
            sess.run_with_iobinding(io)
            return y.addmm_(a.view(1, K // G, G).sum(-1), zero).bfloat16() if zero is not None else y.bfloat16()
        return call
    return build


def _dynq(N: int, K: int):
    """quantized::linear_dynamic (fbgemm) on random int8 codes: torch's own int8-activation path."""
    torch.backends.quantized.engine = "fbgemm"
    q = torch._make_per_channel_quantized_tensor(torch.randint(-127, 128, (N, K), dtype=torch.int8),
                                                 torch.rand(N, dtype=torch.double) * 0.01,
                                                 torch.zeros(N, dtype=torch.long), 0)
    packed = torch.ops.quantized.linear_prepack(q, None)
    del q
    x = torch.randn(1, K).bfloat16()
    return lambda: torch.ops.quantized.linear_dynamic(x.float(), packed).bfloat16()


TOKEN_PATHS = {"int4-g128 (today)": _today("int4-g128"), "int8 (today)": _today("int8"), "dyn-q fbgemm int8": _dynq,
               "ort int4 g128 (a4), bare": _ort(4, False), "ort int4 g128 (a4), wrapped": _ort(4, True),
               "ort int8 (a4), bare": _ort(8, False), "ort int8 (a4), wrapped": _ort(8, True)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--token", action="store_true", help="stream a decode token's matrices (see above)")
    ap.add_argument("--token-path", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.token_path:
        return token_path(args.token_path, args.rounds)
    if args.token:
        return token(args.rounds)
    print(f"torch {torch.__version__}, cpu capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{args.threads} thread(s), load average {os.getloadavg()[0]:.2f}; us per GEMV, median of "
          f"{args.rounds} rounds x {args.reps} calls")
    table: dict[str, dict[str, tuple[float, float]]] = {}
    for mat, (N, K) in SHAPES.items():
        w = torch.randn(N, K) * 0.02
        x = torch.randn(1, K).bfloat16()
        ps = paths(N, K, w, not args.no_compile)
        try:
            ps.update(ort_paths(N, K, w))
        except ImportError:
            pass
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
