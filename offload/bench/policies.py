"""offload-bench policies: hit rate against cache capacity for every policy, Belady's MIN as the bound."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from offload.bench.common import (CacheSize, cache_experts_option, cache_memory_option, cache_sizes, guard, load_trace,
                                  out)

SIZES = "10%,25%,50%,75%"


def policy_table(tr, sizes: list[CacheSize], per_layer: bool = False, batched: bool | None = None) -> dict:
    """{policy: {size label: {hits, misses, uses, hit_rate, slots, capacity_fraction}}} for every policy."""
    from cache import POLICIES, hit_rate_curve

    batched = tr.step_index is not None if batched is None else batched
    pool = tr.num_experts * (1 if per_layer else len(tr.moe_layers))
    slots = [c.slots(pool, tr.expert_bytes) for c in sizes]
    results: dict = {}
    for name in POLICIES:
        rows = hit_rate_curve(tr, [name], slots, per_layer=per_layer, batched_prefill=batched)
        results[name] = {
            c.label: {"hits": r["hits"], "misses": r["misses"], "uses": r["hits"] + r["misses"],
                        "hit_rate": r["hit_rate"], "slots": r["capacity"], "capacity_fraction": r["capacity_fraction"],
                        "bytes_per_token": r["bytes_per_token"]}
            for c, r in zip(sizes, rows)
        }
    return results


def policies(
    trace_path: Path = typer.Argument(..., metavar="TRACE", help=".npz routing trace"),
    cache_experts: Optional[list[str]] = cache_experts_option(SIZES),
    cache_memory: Optional[list[str]] = cache_memory_option(),
    per_layer: bool = typer.Option(False, help="one cache per layer (cache sizes are then per layer)"),
    per_token: bool = typer.Option(False, help="replay a prefill token by token (default: one step per forward "
                                               "call, as the engine runs, when the trace recorded steps)"),
    json_path: Optional[Path] = typer.Option(None, "--json", help="write the results as JSON", show_default="no file"),
    plot: Optional[Path] = typer.Option(None, help="write a hit-rate-vs-capacity plot (needs matplotlib)",
                                        show_default="no plot"),
) -> None:
    """Hit rate vs. cache capacity for every policy, with Belady's MIN as the exact upper bound."""
    def go():
        tr = load_trace(trace_path)
        caps = cache_sizes(cache_experts, cache_memory, SIZES)
        pool = tr.num_experts * (1 if per_layer else len(tr.moe_layers))
        need = int(tr.step_need().max(initial=0))
        for c in caps:
            if (n := c.slots(pool, tr.expert_bytes)) < need:
                raise ValueError(f"cache size {c.label} is {n} of {pool} slots, below {need}, the most distinct "
                                 f"experts one step needs; use --cache-experts {need} or more")
        results = policy_table(tr, caps, per_layer, batched=False if per_token else None)
        scope = "per layer" if per_layer else "all layers"
        t = Table(title=f"hit rate by policy and cache capacity ({scope}; {tr.tokens} tokens, "
                        f"{len(tr.moe_layers)} MoE layers x {tr.num_experts} experts, top-{tr.top_k})")
        t.add_column("policy")
        first = next(iter(results.values()))
        for c in caps:
            r = first[c.label]
            t.add_column(c.label if isinstance(c.experts, int) else f"{c.label}\n({r['slots']} slots)", justify="right")
        for name, row in results.items():
            t.add_row(name, *(f"{100 * row[c.label]['hit_rate']:.1f}%" for c in caps))
        online = [n for n in results if n != "belady"]
        shares = []
        for c in caps:
            best = max(results[n][c.label]["hit_rate"] for n in online)
            opt = results["belady"][c.label]["hit_rate"]
            shares.append(f"{100 * best / opt:.0f}%" if opt else "-")
        t.add_row("[bold]best policy / belady[/]", *shares)
        out.print(t)
        if json_path is not None:
            json_path.write_text(json.dumps({"trace": str(trace_path), "per_layer": per_layer, "policies": results},
                                            indent=1))
        if plot is not None:
            _plot(results, caps, plot)

    guard(go)


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
        xs = [row[c.label]["capacity_fraction"] for c in caps]
        ax.plot(xs, [row[c.label]["hit_rate"] for c in caps], marker="o", label=name,
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


def register(app: typer.Typer) -> None:
    app.command("policies")(policies)
