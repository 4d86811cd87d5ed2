"""offload-bench prefetch: what prefetch buys in real decode on the disk tier, against its oracle ceiling.

  offload-bench prefetch MODEL_DIR --store-dir D --cache-experts 25%,50% --predictor none,gate,oracle --lookahead 0,1

`prefetch` is `offload-bench run` with lists of lookaheads, on the disk tier, where every miss is a read from
the device: the store is read with O_DIRECT (the engine's default), or with `--no-direct-io` buffered, its
pages dropped from the OS page cache (posix_fadvise DONTNEED) before every timed generation and, by default,
after every record read. Dropping only the record read leaves the kernel's readahead of its neighbours in
the page cache, so buffered numbers are warmer than a cold disk. `--predictor oracle` prefetches the routing
recorded for the same decode: what a perfect predictor at that lookahead would buy on this machine. With
`none`, a second identical no-prefetch configuration runs as a control: its ratio is the run's noise floor.
"""
from __future__ import annotations

import json
import random
import statistics
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from offload.bench.common import (cache_experts_option, cache_memory_option, cache_sizes, expert_pool, guard,
                                  loader_for, measure_decode, out, prompt_ids, split_list, timed)
from offload.bench.predictors import DEFAULT_PROMPTS, PREDICTOR_NAMES, lookaheads
# --- prefetch: real decode, disk tier, page cache dropped ----------------------------------------------
def uncache_reads(store) -> None:
    """Make every record read of `store` leave nothing in the page cache, so each miss hits the device
    (nothing to do for direct reads, which bypass it)."""
    if store.direct:
        return
    read = store.read_into

    def read_into(key, buf):
        n = read(key, buf)
        store.drop_cached(key)
        return n

    store.read_into = read_into


def _decode_run(model, ids, n: int, uncached: bool) -> dict:
    """Decode-only numbers for n tokens, cold expert cache and (uncached, buffered) cold page cache each time."""

    def cold_run(m):
        store = model.engine.store
        if uncached and store.tier == "disk" and not store.direct:  # direct reads never fill the page cache
            store.drop_cached()
        return timed(model, ids, m, cold=True)

    t1, s1 = cold_run(1)
    tn, sn = cold_run(n + 1)
    d = {k: sn[k] - s1[k] for k in sn}
    dt = max(tn - t1, 1e-9)
    uses = d["hits"] + d["misses"]
    return {"tok_s": n / dt, "ms_per_token": 1e3 * dt / n, "hit_rate": d["hits"] / uses if uses else 1.0,
            "bytes_per_token": d["bytes"] / n, "stall_ms_per_token": 1e3 * d["stall"] / n,
            "prefetch_issued": d["issued"], "prefetch_useful": d["useful"]}


def _seat_oracles(model_dir: Path, ids, n: int, seats: list) -> None:
    """Record the routing of greedily generating n tokens from `ids`, and make each (model, lookahead) in
    `seats` prefetch exactly that routing: the measured ceiling of prefetch at that lookahead (the oracle does
    not wrap to the next token, so at d >= 1 it never predicts the first MoE layer)."""
    import torch

    from offload.model import OffloadedModel
    from predictors import OraclePredictor

    with OffloadedModel.from_pretrained(model_dir, trace=True) as rec:
        rec.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                     attention_mask=torch.ones_like(ids))
        experts = rec.trace().experts
    for m, d in seats:
        e = m.engine
        e.set_predictor(OraclePredictor(experts, e.moe_layers, e.num_experts, e.top_k, lookahead=d))


def _quartiles(xs: list[float]) -> tuple[float, float]:
    """(first, third) quartile; a single sample is both."""
    if len(xs) < 2:
        return (xs[0], xs[0])
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return (q[0], q[2])


def prefetch_command(
    model_dir: Path = typer.Argument(..., help="Hugging Face checkpoint directory"),
    store_dir: Path = typer.Option(..., help="disk store directory (converted on first use)"),
    cache_experts: Optional[list[str]] = cache_experts_option("25%,50%"),
    cache_memory: Optional[list[str]] = cache_memory_option(),
    predictor: Optional[list[str]] = typer.Option(None, help="predictors, comma-separated, oracle included (the "
                                                  "recorded routing: the ceiling)", show_default="none,previous,gate"),
    lookahead: Optional[list[str]] = typer.Option(None, help="lookaheads for every predictor but none, "
                                                  "comma-separated", show_default="1,2"),
    policy: str = typer.Option("lru", help="eviction policy"),
    width: Optional[int] = typer.Option(None, help="prefetch width (experts per predicted layer)",
                                        show_default="top-k"),
    min_precision: Optional[list[str]] = typer.Option(None, help="pause prefetching while fewer predictions than "
                                                      "this come true; values for every predictor but none, "
                                                      "comma-separated", show_default="0.75"),
    direct_io: bool = typer.Option(True, help="read the store with O_DIRECT (--no-direct-io: buffered reads)"),
    uncached: bool = typer.Option(True, help="buffered reads: drop the store's pages from the OS page cache after "
                                             "every read (--no-uncached: misses may be served from the page cache)"),
    max_new_tokens: int = typer.Option(32, min=1, help="tokens decoded per timed run"),
    repeats: int = typer.Option(3, min=1, help="rounds, each configuration once per round (medians)"),
    prompt: Optional[str] = typer.Option(None, help="prompt text", show_default="an English sentence"),
    json_path: Optional[Path] = typer.Option(None, "--json", help="write the rows as JSON", show_default="no file"),
    threads: int = typer.Option(1, min=1, help="torch CPU threads"),
) -> None:
    """Real decode from the disk tier: no prefetch vs each predictor and lookahead, side by side, medians."""
    from offload.model import OffloadedModel

    def go():
        import torch

        torch.set_num_threads(threads)
        sizes = cache_sizes(cache_experts, cache_memory, "25%,50%")
        preds = split_list(predictor) or ["none", "previous", "gate"]
        bad = [n for n in preds if n not in ("none", *PREDICTOR_NAMES)]
        if bad:
            raise ValueError(f"unknown predictor(s) {bad}; choose from none, {', '.join(PREDICTOR_NAMES)}")
        looks = lookaheads(lookahead, "1,2")
        try:
            floors = [float(x) for x in split_list(min_precision)] or [None]
        except ValueError:
            raise ValueError(f"--min-precision takes numbers in [0, 1] like 0.5,0.75, got {min_precision}") from None
        total, expert_bytes = expert_pool(model_dir)
        opts = {"store": "disk", "store_dir": str(store_dir), "policy": policy, "prefetch_width": width,
                "direct_io": direct_io}
        configs = [("all resident", dict(cache_experts=total), None)]
        for c in sizes:
            slots = min(total, c.slots(total, expert_bytes))
            for pr in preds:
                for d in ([1] if pr == "none" else looks):
                    for p in ([None] if pr in ("none", "oracle") else floors):  # the oracle is never paused
                        name = (f"{c.label} ({slots}) {pr}" + ("" if pr == "none" else f" d={d}")
                                + ("" if p is None or len(floors) == 1 else f" p>={p:g}"))
                        # the oracle takes a gate's seat (same hooks, same loader), then replays the routing
                        o = dict(cache_experts=slots, predictor={"none": None, "oracle": "gate"}.get(pr, pr),
                                 lookahead=d)
                        if p is not None:
                            o["prefetch_min_precision"] = p
                        configs.append((name, o, (c.label, pr)))
                        if pr == "none":  # the same configuration again: this run's noise floor, in its own row
                            configs.append((name + " again (control)", dict(o), (c.label, "control")))
        models = []
        direct = False
        with out.status("loading configurations ..."):
            for _, o, _ in configs:
                m = OffloadedModel.from_pretrained(model_dir, **o, **opts)
                direct = m.engine.store.direct
                if uncached:
                    uncache_reads(m.engine.store)
                models.append(m)
        try:
            ids = prompt_ids(models[0], prompt or DEFAULT_PROMPTS[0], 32)
            models[0].generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
            if "oracle" in preds:
                _seat_oracles(model_dir, ids, max_new_tokens + 1,
                              [(m, o["lookahead"]) for m, (_, o, g) in zip(models, configs) if g and g[1] == "oracle"])
            for m in models:
                measure_decode(m, ids, 1, cold=True)  # discarded: first-call costs stay out of the medians
            samples: list[list[dict]] = [[] for _ in configs]
            # each round in its own shuffled order, so that no configuration always runs right after the same
            # one: whatever a run leaves behind (a loader process, the disk's queue) spreads over every row
            for r in range(repeats):
                order = list(range(len(models)))
                random.Random(r).shuffle(order)
                for i in order:
                    loader_for(models, models[i])
                    samples[i].append(_decode_run(models[i], ids, max_new_tokens, uncached))
        finally:
            for m in models:
                m.close()
        rows = []
        for (name, o, group), s in zip(configs, samples):
            med = {k: statistics.median(x[k] for x in s) for k in s[0]}
            rows.append({"config": name, **o, "capacity": group[0] if group else "all", "predictor":
                         group[1] if group else "none", **med, "samples_tok_s": [x["tok_s"] for x in s]})
        # per round, each configuration against the no-prefetch run of the same round; the median of those
        # ratios cancels drift slower than a round (this VM's speed moves by 10-20% over minutes)
        base = {r["capacity"]: s for r, s in zip(rows, samples) if r["predictor"] == "none"}
        for r, s in zip(rows, samples):
            b = base.get(r["capacity"])
            ratios = [x["tok_s"] / y["tok_s"] for x, y in zip(s, b)] if b is not None else []
            r["vs_no_prefetch"] = statistics.median(ratios) if ratios else None
            # the spread says whether a median ratio is a win or this VM's noise
            r["vs_no_prefetch_iqr"] = _quartiles(ratios) if ratios else None
            r["faster_rounds"] = sum(x > 1 for x in ratios)
        how = "direct I/O" if direct else "page cache dropped" if uncached else "page cache kept"
        t = Table(title=f"measured decode, disk tier ({how}): {model_dir.name}, {max_new_tokens} new tokens, "
                        f"median of {repeats} rounds ('vs no prefetch': median of per-round ratios), {policy}")
        for col in ("config", "tok/s", "ms/token", "vs no prefetch", "ratio IQR", "faster rounds", "hit rate",
                    "KB/token", "stall ms/tok", "prefetch useful/issued"):
            t.add_column(col, justify="left" if col == "config" else "right")
        for r in rows:
            q = r["vs_no_prefetch_iqr"]
            paired = r["vs_no_prefetch"] is not None and r["predictor"] != "none"
            t.add_row(r["config"], f"{r['tok_s']:.1f}", f"{r['ms_per_token']:.2f}",
                      "-" if r["vs_no_prefetch"] is None else f"{r['vs_no_prefetch']:.2f}x",
                      f"{q[0]:.2f}-{q[1]:.2f}" if paired else "-",
                      f"{r['faster_rounds']}/{repeats}" if paired else "-", f"{r['hit_rate']:.1%}",
                      f"{r['bytes_per_token'] / 1e3:.1f}", f"{r['stall_ms_per_token']:.2f}",
                      f"{r['prefetch_useful']:.0f}/{r['prefetch_issued']:.0f}")
        out.print(t)
        if json_path is not None:
            json_path.write_text(json.dumps({"model": str(model_dir), "direct_io": direct, "uncached": uncached,
                                             "rows": rows}, indent=1,
                                            default=str))

    guard(go)


def register(app: typer.Typer) -> None:
    app.command("prefetch")(prefetch_command)
