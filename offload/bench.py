"""offload-bench: record routing traces, compare cache policies on them, project 24 GB-card speeds, and
measure real end-to-end decode on this machine.

  offload-bench trace MODEL_DIR --prompt TEXT --max-new-tokens 64 --out trace.npz
  offload-bench policies trace.npz --capacity 0.1,0.25,0.5 --json policies.json
  offload-bench project --trace trace.npz --bits 4 --machine rtx4090
  offload-bench run MODEL_DIR --capacity 0.25,0.5 --policy lru,score --max-new-tokens 16 --repeats 3

List options take comma-separated values and may be repeated (--capacity 0.1,0.25 --capacity 0.5).
Every user error is one red line and exit code 2.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import statistics
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from cache.simulate import slots_for
from offload.cli import _run, fail
from offload.errors import OffloadError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Benchmarks: routing traces, cache-policy replay, 24 GB-card projections, real decode runs.")
out = Console()


def _split(values: Optional[list[str]]) -> list[str]:
    return [v.strip() for value in values or [] for v in value.split(",") if v.strip()]


def parse_capacity(value: str) -> int | float:
    """'0.25' or '25%' -> a fraction of all experts; '12' -> 12 slots."""
    try:
        if value.endswith("%"):
            return float(value[:-1]) / 100
        return float(value) if any(c in value for c in ".eE") else int(value)
    except ValueError:
        raise ValueError(f"cannot read capacity {value!r}: write a fraction like 0.25 or 25%, or a slot count like 12")


def _capacities(values: Optional[list[str]], default: str) -> list[int | float]:
    caps = [parse_capacity(v) for v in _split(values) or default.split(",")]
    for c in caps:
        if isinstance(c, float) and not 0.0 < c <= 1.0:
            raise ValueError(f"capacity fraction {c} must be in (0, 1]; pass an integer for a slot count")
        if isinstance(c, int) and c < 1:
            raise ValueError(f"capacity {c} must be at least 1 slot")
    return caps


def _label(c: int | float) -> str:
    return f"{c:g}" if isinstance(c, float) else f"{c} slots"


def _guard(fn):
    """Run fn(); OffloadError / ValueError / missing files become one red line and exit 2."""
    try:
        return fn()
    except (OffloadError, ValueError, FileNotFoundError, KeyError) as e:
        fail(str(e).strip("'\""))


def _load_trace(path: Path):
    from cache import Trace

    if not path.exists():
        raise FileNotFoundError(f"trace file {path} does not exist; record one with `offload-bench trace`")
    try:
        return Trace.load(path)
    except (OSError, EOFError) as e:  # not a zip / corrupt
        raise ValueError(f"{path} is not a readable .npz trace ({e})") from None


# --- trace -----------------------------------------------------------------------------------------
def _total_experts(model_dir: Path) -> int:
    from offload.config import parse_dtype
    from offload.source import open_checkpoint

    return len(open_checkpoint(model_dir, parse_dtype("bfloat16"))[2].keys())


def _prompt_ids(model, text: Optional[str], n: int, seed: int = 0):
    import torch

    if text is not None and model.tokenizer is not None:
        ids = model.tokenizer(text, return_tensors="pt").input_ids
        if ids.shape[1]:
            return ids
    vocab = model.model.config.get_text_config().vocab_size
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (1, n), generator=g)


@app.command()
def trace(
    model_dir: Path = typer.Argument(..., help="Hugging Face checkpoint directory"),
    prompt: Optional[list[str]] = typer.Option(None, "--prompt", "-p", help="a prompt (repeatable)"),
    prompts: Optional[Path] = typer.Option(None, help="a text file, one prompt per line"),
    max_new_tokens: int = typer.Option(32, min=1),
    out_path: Path = typer.Option(Path("trace.npz"), "--out", "-o", help="where to write the .npz trace"),
    prompt_tokens: int = typer.Option(32, min=1, help="random prompt length when the model has no tokenizer"),
) -> None:
    """Generate greedily and record which experts each token routed to (as many experts resident as fit)."""
    import torch

    from offload.model import OffloadedModel

    def go():
        texts = list(prompt or [])
        if prompts is not None:
            if not prompts.exists():
                raise FileNotFoundError(f"prompts file {prompts} does not exist")
            texts += [line.strip() for line in prompts.read_text().splitlines() if line.strip()]
        model = OffloadedModel.from_pretrained(model_dir, trace=True)  # routing never depends on the cache size
        try:
            for i, text in enumerate(texts or [None]):
                ids = _prompt_ids(model, text, prompt_tokens, seed=i)
                model.generate(ids, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                               pad_token_id=0, attention_mask=torch.ones_like(ids))
            tr = model.trace()
        finally:
            model.close()
        tr.save(out_path)
        t = Table(title=f"routing trace -> {out_path}", show_header=False)
        for k, v in (("model", f"{model_dir} ({tr.model_type})"), ("tokens", tr.tokens),
                     ("prompts", len(tr.prompt_boundaries or [])), ("MoE layers", len(tr.moe_layers)),
                     ("experts per layer / top-k", f"{tr.num_experts} / {tr.top_k}"),
                     ("distinct experts used", f"{len(set(tr.keys()))} of {tr.num_experts * len(tr.moe_layers)}"),
                     ("expert bytes", tr.expert_bytes)):
            t.add_row(k, str(v))
        out.print(t)

    _guard(go)


# --- policies --------------------------------------------------------------------------------------
def policy_table(tr, capacities, per_layer: bool = False, batched: bool | None = None) -> dict:
    """{policy: {capacity label: {hits, misses, uses, hit_rate, slots, capacity_fraction}}} for every policy."""
    from cache import POLICIES, hit_rate_curve

    batched = tr.step_index is not None if batched is None else batched
    results: dict = {}
    for name in POLICIES:
        rows = hit_rate_curve(tr, [name], capacities, per_layer=per_layer, batched_prefill=batched)
        results[name] = {
            _label(c): {"hits": r["hits"], "misses": r["misses"], "uses": r["hits"] + r["misses"],
                        "hit_rate": r["hit_rate"], "slots": r["capacity"], "capacity_fraction": r["capacity_fraction"],
                        "bytes_per_token": r["bytes_per_token"]}
            for c, r in zip(capacities, rows)
        }
    return results


@app.command()
def policies(
    trace_path: Path = typer.Argument(..., metavar="TRACE", help=".npz routing trace"),
    capacity: Optional[list[str]] = typer.Option(None, help="fractions of all experts (0.25, 25%) or slot counts; "
                                                 "comma-separated [default: 0.1,0.25,0.5,0.75]"),
    per_layer: bool = typer.Option(False, help="one cache per layer (capacity is then per layer)"),
    per_token: bool = typer.Option(False, help="replay a prefill token by token (default: one step per forward "
                                               "call, as the engine runs, when the trace recorded steps)"),
    json_path: Optional[Path] = typer.Option(None, "--json", help="write the results as JSON"),
    plot: Optional[Path] = typer.Option(None, help="write a hit-rate-vs-capacity plot (needs matplotlib)"),
) -> None:
    """Hit rate vs. cache capacity for every policy, with Belady's MIN as the exact upper bound."""
    def go():
        tr = _load_trace(trace_path)
        caps = _capacities(capacity, "0.1,0.25,0.5,0.75")
        results = policy_table(tr, caps, per_layer, batched=False if per_token else None)
        scope = "per layer" if per_layer else "all layers"
        t = Table(title=f"hit rate by policy and cache capacity ({scope}; {tr.tokens} tokens, "
                        f"{len(tr.moe_layers)} MoE layers x {tr.num_experts} experts, top-{tr.top_k})")
        t.add_column("policy")
        first = next(iter(results.values()))
        for c in caps:
            r = first[_label(c)]
            t.add_column(f"{_label(c)}\n({r['slots']} slots)" if isinstance(c, float) else _label(c), justify="right")
        for name, row in results.items():
            t.add_row(name, *(f"{100 * row[_label(c)]['hit_rate']:.1f}%" for c in caps))
        online = [n for n in results if n != "belady"]
        shares = []
        for c in caps:
            best = max(results[n][_label(c)]["hit_rate"] for n in online)
            opt = results["belady"][_label(c)]["hit_rate"]
            shares.append(f"{100 * best / opt:.0f}%" if opt else "-")
        t.add_row("[bold]best policy / belady[/]", *shares)
        out.print(t)
        if json_path is not None:
            json_path.write_text(json.dumps({"trace": str(trace_path), "per_layer": per_layer, "policies": results},
                                            indent=1))
        if plot is not None:
            _plot(results, caps, plot)

    _guard(go)


def _plot(results: dict, caps, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        out.print("[yellow]--plot skipped: matplotlib is not installed (pip install 'moe-offload\\[plot]')[/]")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, row in results.items():
        xs = [row[_label(c)]["capacity_fraction"] for c in caps]
        ax.plot(xs, [row[_label(c)]["hit_rate"] for c in caps], marker="o", label=name,
                linestyle="--" if name == "belady" else "-")
    ax.set_xlabel("cache capacity (fraction of experts)")
    ax.set_ylabel("hit rate")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.name + ".partial")
    fig.savefig(tmp, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    os.replace(tmp, path)  # atomic: an interrupted run never leaves half a picture
    out.print(f"plot written to {path}")


# --- project ---------------------------------------------------------------------------------------
def static_hit_rate(tr, slots: int) -> float:
    """Hit rate of a static GPU set: the `slots` most used experts of the whole trace (a frequency oracle),
    which is what a CPU-compute design (Fiddler, llama.cpp -ot) keeps on the GPU: it never moves experts."""
    import numpy as np

    ids = np.where(tr.valid, tr.experts, -1)  # [T, L, K]
    counts = [np.bincount(ids[:, li][ids[:, li] >= 0], minlength=tr.num_experts) for li in range(ids.shape[1])]
    flat = np.sort(np.concatenate(counts))[::-1]
    return float(flat[:slots].sum() / flat.sum()) if flat.sum() else 0.0


def projection_rows(trace_path: Optional[Path], bits: str, machine: str, hit_rates: list[float],
                    policy: str = "lru", context: int = 0) -> list[dict]:
    from cache import hit_rate_curve
    from offload import costmodel as cm

    mach = cm.machine(machine)
    tr = _load_trace(trace_path) if trace_path is not None else None
    rows = []
    for shape in cm.PRESETS.values():
        f = cm.fit(shape, mach, bits, context)
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
            p = cm.project(shape, mach, h, bits, cpu_hit_rate=h_static)
            rows.append({"model": shape.name, "expert_mb": f.expert_bytes / 1e6, "slots": f.slots,
                         "total_experts": f.total_experts, "fraction": f.fraction, "hit_rate": h, "cpu_hit_rate": h_static,
                         "hit_source": source,
                         "gb_per_token": p.bytes_per_token / 1e9, "stream_tok_s": p.stream_tok_s,
                         "cpu_tok_s": p.cpu_tok_s, "best": p.best, "best_tok_s": p.best_tok_s,
                         "link_ceiling_tok_s": p.link_ceiling_tok_s})
    return rows


@app.command()
def project(
    trace_path: Optional[Path] = typer.Option(None, "--trace", help="take hit rates from this trace's hit-rate curve"),
    bits: str = typer.Option("4", help="expert format: 16, 8, 4, 3, 2, mxfp4"),
    machine: str = typer.Option("rtx4090", help="rtx3090, rtx4090, rtx4090-pcie5 or local (measured now)"),
    hit_rate: Optional[list[str]] = typer.Option(None, help="project at these hit rates (comma-separated)"),
    policy: str = typer.Option("lru", help="policy whose trace hit rate is used"),
    context: int = typer.Option(0, min=0, help="tokens of KV cache to reserve beyond the 3 GB allowance"),
    json_path: Optional[Path] = typer.Option(None, "--json", help="write the rows as JSON"),
) -> None:
    """PROJECTED (not measured) batch-1 decode ceilings for the preset models on one card."""
    from offload import costmodel as cm

    def go():
        hs = [float(h) for h in _split(hit_rate)]
        if any(not 0 <= h <= 1 for h in hs):
            raise ValueError(f"hit rates must be in [0, 1], got {hs}")
        cm.bits_per_weight(bits if not bits.isdigit() else int(bits))
        b = int(bits) if bits.isdigit() else bits
        mach = cm.machine(machine)
        rows = projection_rows(trace_path, b, machine if machine != "local" else "local", hs, policy, context)
        t = Table(title=f"PROJECTION, not a measurement: batch-1 decode ceilings on {mach.name} "
                        f"({mach.vram / 1e9:.0f} GB, link {mach.link_bw / 1e9:.0f} GB/s pinned, RAM "
                        f"{mach.ram_bw / 1e9:.0f} GB/s), experts at {cm.bits_per_weight(b):g} bits/weight")
        for col in ("model", "expert MB", "experts that fit", "hit rate\nLRU / static", "GB/token missed",
                    "stream tok/s", "CPU-compute tok/s", "best", "link ceiling"):
            t.add_column(col, justify="left" if col in ("model", "best") else "right")
        for r in rows:
            t.add_row(r["model"], f"{r['expert_mb']:.1f}", f"{r['slots']}/{r['total_experts']} ({r['fraction']:.0%})",
                      f"{r['hit_rate']:.1%} / {r['cpu_hit_rate']:.1%}", f"{r['gb_per_token']:.2f}", f"{r['stream_tok_s']:.1f}",
                      f"{r['cpu_tok_s']:.1f}", r["best"],
                      "-" if math.isinf(r["link_ceiling_tok_s"]) else f"{r['link_ceiling_tok_s']:.1f}")
        out.print(t)
        src = "; ".join(dict.fromkeys(r["hit_source"] for r in rows))
        out.print(f"Assumptions: rooflines (bytes / bandwidth), no kernel or Python overheads, no copy/compute overlap; "
                  f"non-expert weights bf16 if <= 2.5 B params else at the expert format; {mach.reserve / 1e9:g} GB "
                  f"reserved for CUDA context, KV cache and workspace; hit rates from: {src} (a small model's trace "
                  f"stands in for the big ones; short traces undercount hits by their cold misses); stream: misses copied over the link into an LRU cache; "
                  f"CPU-compute: a static hot set on the GPU, misses computed from RAM; streaming beats computing every "
                  f"expert on the CPU above h = {cm.crossover_hit_rate(mach):.2f}. Real systems reach ~60-70% of these ceilings.", highlight=False)
        a = Table(title="published numbers of the anchors (as their authors report them, other hardware)")
        for col in ("system", "model", "decode", "setting"):
            a.add_column(col)
        for row in cm.ANCHORS:
            a.add_row(*row)
        out.print(a)
        if json_path is not None:
            json_path.write_text(json.dumps({"machine": mach.name, "bits": bits, "rows": rows}, indent=1))

    _guard(go)


# --- run -------------------------------------------------------------------------------------------
def _snapshot(model) -> dict:
    model.engine.prefetcher.drain()
    s = model.stats()
    return {"hits": s["hits"], "misses": s["misses"], "bytes": sum(s["bytes_loaded"].values()),
            "stall": s["stall_seconds"], "issued": s["prefetch_issued"], "useful": s["prefetch_useful"]}


def _timed(model, ids, n: int, cold: bool) -> tuple[float, dict]:
    from offload.costmodel import timed_generate

    seconds, _ = timed_generate(model, ids, n, cold)
    return seconds, _snapshot(model)


def loader_for(models: list, model) -> None:
    """Before timing `model`: stop every other model's loader process and fork its own now, so one loader is
    alive at a time and no fork lands inside a timing (see `Prefetcher.stop_loader`)."""
    for other in models:
        if other is not model:
            other.engine.prefetcher.stop_loader()
    model.engine.prefetcher.start_loader()


def measure_decode(model, ids, n: int, cold: bool = True) -> dict:
    """Decode-only numbers for n tokens: (N+1 new tokens) minus (1 new token), both from the same state."""
    t1, s1 = _timed(model, ids, 1, cold)
    tn, sn = _timed(model, ids, n + 1, cold)
    d = {k: sn[k] - s1[k] for k in sn}
    dt = max(tn - t1, 1e-9)
    uses = d["hits"] + d["misses"]
    return {"tok_s": n / dt, "hit_rate": d["hits"] / uses if uses else 1.0, "bytes_per_token": d["bytes"] / n,
            "stall_ms_per_token": 1e3 * d["stall"] / n, "prefetch_issued": d["issued"], "prefetch_useful": d["useful"]}


@app.command()
def run(
    model_dir: Path = typer.Argument(..., help="Hugging Face checkpoint directory"),
    capacity: Optional[list[str]] = typer.Option(None, help="cache sizes: fractions or slot counts [default: 0.25,0.5]"),
    policy: Optional[list[str]] = typer.Option(None, help="eviction policies [default: lru]"),
    predictor: Optional[list[str]] = typer.Option(None, help="predictors: none, gate, previous, ... [default: none]"),
    lookahead: int = typer.Option(1, min=0, max=8, help="MoE layers the predictor looks ahead (0: from the layer's own entry)"),
    store: str = typer.Option("ram", help="ram or disk"),
    store_dir: Optional[Path] = typer.Option(None, help="disk store directory (store=disk)"),
    max_new_tokens: int = typer.Option(16, min=1),
    repeats: int = typer.Option(3, min=1),
    prompt: Optional[str] = typer.Option(None, help="prompt text (default: random token ids)"),
    prompt_tokens: int = typer.Option(32, min=1),
    json_path: Optional[Path] = typer.Option(None, "--json", help="write the rows as JSON"),
    threads: int = typer.Option(1, min=1, help="torch CPU threads"),
) -> None:
    """Real decode on this machine: every configuration side by side in one process, alternating, medians."""
    from offload import costmodel as cm
    from offload.model import OffloadedModel

    def go():
        import torch

        torch.set_num_threads(threads)
        caps = _capacities(capacity, "0.25,0.5")
        pols = _split(policy) or ["lru"]
        preds = _split(predictor) or ["none"]
        total = _total_experts(model_dir)
        opts = {"store": store, "store_dir": str(store_dir) if store_dir else None}
        configs = [("all resident", dict(cache_experts=total, policy="lru"))]
        for c, p, pr in itertools.product(caps, pols, preds):
            slots = min(total, slots_for(c, total))
            configs.append((f"{_label(c)} ({slots}) {p} {pr}",
                            dict(cache_experts=slots, policy=p,
                                 predictor=None if pr == "none" else pr, lookahead=lookahead)))
        models = []
        with out.status("loading configurations ..."):
            for name, o in configs:
                models.append(OffloadedModel.from_pretrained(model_dir, **o, **opts))
        try:
            ids = _prompt_ids(models[0], prompt, prompt_tokens)
            models[0].generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)  # warm: all experts resident
            for i, m in enumerate(models):  # one discarded pass each: first-call costs stay out of the medians
                measure_decode(m, ids, 1, cold=i > 0)
            samples: list[list[dict]] = [[] for _ in configs]
            # the cost model is calibrated on microbenchmarks (never on these runs), once per round right
            # after it, so a shared machine's load changes reach measurement and calibration alike
            config = json.loads((Path(model_dir) / "config.json").read_text())
            eng = models[-1].engine
            profs = []
            for _ in range(repeats):
                for i, m in enumerate(models):
                    loader_for(models, m)
                    samples[i].append(measure_decode(m, ids, max_new_tokens, cold=i > 0))
                with out.status("calibrating the cost model ..."):
                    profs.append(cm.calibrate_local(config, eng.store, eng.store.keys()[::3][:16], seconds=0.1,
                                                    threads=threads, probe_repeats=3))
            fmt = "bf16"
            if eng.codec is not None:
                kind = str(eng.store.format_of(eng.store.keys()[0]))
                fmt = next((f for f in ("int8", "int4") if kind.startswith(f)), "bf16")
        finally:
            for m in models:
                m.close()
        shape = cm.ModelShape.from_config(config, model_dir.name)
        tier = eng.store.tier
        rows = []
        for (name, o), s in zip(configs, samples):
            med = {k: statistics.median(x[k] for x in s) for k in s[0]}
            pred = statistics.median(cm.local_tok_s(shape, p, med["hit_rate"], fmt=fmt, tier=tier,
                                                    record_bytes=eng.store.record_bytes, config=config)
                                     for p in profs)
            rows.append({"config": name, **o, **med, "predicted_tok_s": pred,
                         "predicted_error": pred / med["tok_s"] - 1})
        prof = sorted(profs, key=lambda p: cm.local_decode_seconds(shape, p, 1.0, config=config))[len(profs) // 2]
        base = rows[0]["tok_s"]
        t = Table(title=f"measured decode on this machine: {model_dir.name}, {max_new_tokens} new tokens, "
                        f"median of {repeats}, store={store}")
        for col in ("config", "tok/s", "vs resident", "hit rate", "KB/token", "stall ms/tok", "prefetch useful/issued",
                    "cost model tok/s", "model error"):
            t.add_column(col, justify="left" if col == "config" else "right")
        for r in rows:
            t.add_row(r["config"], f"{r['tok_s']:.1f}", f"{r['tok_s'] / base:.2f}x", f"{r['hit_rate']:.1%}",
                      f"{r['bytes_per_token'] / 1e3:.1f}", f"{r['stall_ms_per_token']:.2f}",
                      f"{r['prefetch_useful']:.0f}/{r['prefetch_issued']:.0f}", f"{r['predicted_tok_s']:.1f}",
                      f"{100 * r['predicted_error']:+.0f}%")
        out.print(t)
        out.print(f"cost model (offload.costmodel.local_decode_seconds, {fmt} experts, {tier} tier, at the measured hit "
                  f"rate, median over {len(profs)} calibrations), calibrated on microbenchmarks, not on these runs; "
                  f"median calibration: {prof.describe()}", highlight=False)
        if json_path is not None:
            profiles = [{**vars(p), "gemv_s": {f"{n}x{k}": v for (n, k), v in (p.gemv_s or {}).items()}}
                        for p in profs]
            json_path.write_text(json.dumps({"model": str(model_dir), "local": prof.describe(),
                                             "profiles": profiles, "rows": rows}, indent=1, default=str))

    _guard(go)


def main() -> None:
    from offload import bench_formats, bench_peers, bench_predictors, decode_bench

    for module in (bench_formats, bench_predictors, bench_peers, decode_bench):
        module.register(app)
    _run(app)


if __name__ == "__main__":
    main()
