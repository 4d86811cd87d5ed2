"""offload-bench project: PROJECTED batch-1 decode ceilings of the preset models on one card."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from offload.bench.common import guard, load_trace, out, split_list


def static_hit_rate(tr, slots: int) -> float:
    """Hit rate of a static GPU set: the `slots` most used experts of the whole trace (a frequency oracle),
    which is what a CPU-compute design (Fiddler, llama.cpp -ot) keeps on the GPU: it never moves experts."""
    import numpy as np

    ids = np.where(tr.valid, tr.experts, -1)  # [T, L, K]
    counts = [np.bincount(ids[:, li][ids[:, li] >= 0], minlength=tr.num_experts) for li in range(ids.shape[1])]
    flat = np.sort(np.concatenate(counts))[::-1]
    return float(flat[:slots].sum() / flat.sum()) if flat.sum() else 0.0


def projection_rows(trace_path: Optional[Path], bits: str, machine: str, hit_rates: list[float],
                    policy: str = "lru", context: int = 0, dense_bits: Optional[int] = None,
                    cpu_bw: Optional[float] = None) -> list[dict]:
    """`cpu_bw`: a measured CPU GEMV rate (bytes/s) for the extra measured-CPU and hybrid columns."""
    from cache import hit_rate_curve
    from offload.bench import costmodel as cm

    mach = cm.machine(machine)
    tr = load_trace(trace_path) if trace_path is not None else None
    rows = []
    for shape in cm.PRESETS.values():
        f = cm.fit(shape, mach, bits, context, dense_bits)
        hs = [(h, h) for h in hit_rates]  # (dynamic cache hit rate, static hot-set hit rate)
        source = "given (same for both designs)"
        if not hs:
            if f.fraction >= 1.0:
                hs, source = [(1.0, 1.0)], "all experts resident"
            elif tr is None:
                hs = [(h, h) for h in (0.0, 0.5, 0.9)]
            else:
                pool = tr.num_experts * len(tr.moe_layers)
                need = int(tr.step_need().max(initial=0))
                slots = min(pool, max(need, round(f.fraction * pool), 1))
                r = hit_rate_curve(tr, [policy], [slots], batched_prefill=tr.step_index is not None)[0]
                hs = [(r["hit_rate"], static_hit_rate(tr, slots))]
                source = f"trace: {policy} (stream) / static top-N (CPU) @ {slots}/{pool} slots"
        for h, h_static in hs:
            p = cm.project(shape, mach, h, bits, cpu_hit_rate=h_static, dense_bits=dense_bits)
            q = cm.project(shape, mach, h, bits, cpu_hit_rate=h_static, dense_bits=dense_bits, cpu_bw=cpu_bw)
            rows.append({"model": shape.name, "expert_mb": f.expert_bytes / 1e6, "slots": f.slots,
                         "total_experts": f.total_experts, "fraction": f.fraction, "hit_rate": h, "cpu_hit_rate": h_static,
                         "hit_source": source,
                         "gb_per_token": p.bytes_per_token / 1e9, "stream_tok_s": p.stream_tok_s,
                         "cpu_tok_s": p.cpu_tok_s, "best": p.best, "best_tok_s": p.best_tok_s,
                         "link_ceiling_tok_s": p.link_ceiling_tok_s, "hybrid_tok_s": p.hybrid_tok_s,
                         "measured_cpu_tok_s": q.cpu_tok_s, "measured_hybrid_tok_s": q.hybrid_tok_s})
    return rows


def project(
    trace_path: Optional[Path] = typer.Option(None, "--trace", help="take hit rates from this trace's hit-rate curve",
                                              show_default="hit rates 0, 0.5 and 0.9"),
    bits: str = typer.Option("4", help="expert format: 16, 8, 4, 3, 2, int4-g32, ..., mxfp4, ternary"),
    machine: str = typer.Option("rtx4090", help="rtx3090, rtx4090, rtx4090-pcie5 or local (measured now)"),
    hit_rate: Optional[list[str]] = typer.Option(None, help="project at these hit rates (comma-separated)",
                                                 show_default="from --trace"),
    policy: str = typer.Option("lru", help="policy whose trace hit rate is used"),
    context: int = typer.Option(0, min=0, help="tokens of KV cache to reserve beyond the 3 GB allowance"),
    dense_bits: Optional[int] = typer.Option(None, help="non-expert linears at 8 or 4 bits",
                                             show_default="bf16 up to 2.5 B params, else the expert format"),
    json_path: Optional[Path] = typer.Option(None, "--json", help="write the rows as JSON", show_default="no file"),
    cpu_threads: int = typer.Option(16, min=1, help="threads of the measured-CPU columns: this CPU's bf16 GEMV rate "
                                                    "per thread (measured now) times this, at most the RAM roofline"),
) -> None:
    """PROJECTED (not measured) batch-1 decode ceilings for the preset models on one card."""
    from offload.bench import costmodel as cm

    def go():
        hs = [float(h) for h in split_list(hit_rate)]
        if any(not 0 <= h <= 1 for h in hs):
            raise ValueError(f"hit rates must be in [0, 1], got {hs}")
        cm.bits_per_weight(bits if not bits.isdigit() else int(bits))
        b = int(bits) if bits.isdigit() else bits
        mach = cm.machine(machine)
        if dense_bits not in (None, 8, 4):
            raise ValueError(f"dense_bits must be 8 or 4 (or None), got {dense_bits}")
        per_thread = cm.measure_local(threads=1).gpu_bw  # this CPU's bf16 GEMV bytes/s on one thread
        cpu_bw = min(mach.ram_bw, per_thread * cpu_threads)
        rows = projection_rows(trace_path, b, machine if machine != "local" else "local", hs, policy, context,
                               dense_bits, cpu_bw)
        t = Table(title=f"PROJECTION, not a measurement: batch-1 decode ceilings on {mach.name} "
                        f"({mach.vram / 1e9:.0f} GB, link {mach.link_bw / 1e9:.0f} GB/s pinned, RAM "
                        f"{mach.ram_bw / 1e9:.0f} GB/s), experts at {cm.bits_per_weight(b):g} bits/weight")
        for col in ("model", "expert MB", "experts that fit", "hit rate\nLRU / static", "GB/token missed",
                    "stream tok/s", "CPU-compute tok/s", "hybrid tok/s", "CPU-compute tok/s\nthis CPU",
                    "hybrid tok/s\nthis CPU", "best", "link ceiling"):
            t.add_column(col, justify="left" if col in ("model", "best") else "right")
        for r in rows:
            t.add_row(r["model"], f"{r['expert_mb']:.1f}", f"{r['slots']}/{r['total_experts']} ({r['fraction']:.0%})",
                      f"{r['hit_rate']:.1%} / {r['cpu_hit_rate']:.1%}", f"{r['gb_per_token']:.2f}", f"{r['stream_tok_s']:.1f}",
                      f"{r['cpu_tok_s']:.1f}", f"{r['hybrid_tok_s']:.1f}", f"{r['measured_cpu_tok_s']:.1f}",
                      f"{r['measured_hybrid_tok_s']:.1f}", r["best"],
                      "-" if math.isinf(r["link_ceiling_tok_s"]) else f"{r['link_ceiling_tok_s']:.1f}")
        out.print(t)
        src = "; ".join(dict.fromkeys(r["hit_source"] for r in rows))
        out.print("Assumptions: rooflines (bytes / bandwidth), no kernel or Python overheads, no copy/compute overlap; "
                  "non-expert weights " + (f"linears int{dense_bits}, embeddings bf16; " if dense_bits else
                                            "bf16 if <= 2.5 B params else at the expert format; ") + f"{mach.reserve / 1e9:g} GB "
                  f"reserved for CUDA context, KV cache and workspace; hit rates from: {src} (a small model's trace "
                  f"stands in for the big ones; short traces undercount hits by their cold misses); stream: misses copied over the link into an LRU cache; "
                  f"CPU-compute: a static hot set on the GPU, misses computed from RAM; hybrid (miss='auto'): the "
                  f"dynamic cache, each missed byte down the faster of link and CPU GEMV; 'this CPU' columns: the CPU "
                  f"GEMV at {cpu_bw / 1e9:.1f} GB/s (measured {per_thread / 1e9:.1f} GB/s on one thread here, times "
                  f"{cpu_threads}, capped at the RAM roofline) instead of the roofline; streaming beats computing every "
                  f"expert on the CPU above h = {cm.crossover_hit_rate(mach):.2f}. Real systems reach ~60-70% of these ceilings.", highlight=False)
        a = Table(title="published numbers of the anchors (as their authors report them, other hardware)")
        for col in ("system", "model", "decode", "setting"):
            a.add_column(col)
        for row in cm.ANCHORS:
            a.add_row(*row)
        out.print(a)
        if json_path is not None:
            json_path.write_text(json.dumps({"machine": mach.name, "bits": bits, "rows": rows}, indent=1))

    guard(go)


def register(app: typer.Typer) -> None:
    app.command("project")(project)
