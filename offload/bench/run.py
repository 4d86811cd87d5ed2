"""offload-bench run: real decode on this machine, every configuration side by side in one process."""
from __future__ import annotations

import itertools
import json
import statistics
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from offload.cli.common import bits_option
from offload.bench.common import (cache_experts_option, cache_memory_option, cache_sizes, expert_pool, guard,
                                  loader_for, measure_decode, out, prompt_ids, split_list)

SIZES = "25%,50%"


def run(
    model_dir: Path = typer.Argument(..., help="Hugging Face checkpoint directory"),
    cache_experts: Optional[list[str]] = cache_experts_option(SIZES),
    cache_memory: Optional[list[str]] = cache_memory_option(),
    policy: Optional[list[str]] = typer.Option(None, help="eviction policies, comma-separated", show_default="lru"),
    predictor: Optional[list[str]] = typer.Option(None, help="predictors, comma-separated: none, gate, previous, ...",
                                                  show_default="none"),
    lookahead: int = typer.Option(1, min=0, max=8, help="MoE layers the predictor looks ahead (0: from the layer's own entry)"),
    store: Optional[str] = typer.Option(None, help="ram (the checkpoint's safetensors through mmap; the OS page cache "
                                                   "is the RAM tier) or disk (a converted store, --store-dir)",
                                        show_default="disk with --store-dir, else ram"),
    store_dir: Optional[Path] = typer.Option(None, help="disk store directory (converted on first use)",
                                             show_default="none; needed with --store disk"),
    max_new_tokens: int = typer.Option(16, min=1, help="tokens decoded per timed run"),
    repeats: int = typer.Option(3, min=1, help="timed runs per configuration (medians)"),
    prompt: Optional[str] = typer.Option(None, help="prompt text", show_default="random token ids"),
    prompt_tokens: int = typer.Option(32, min=1, help="random prompt length"),
    json_path: Optional[Path] = typer.Option(None, "--json", help="write the rows as JSON", show_default="no file"),
    threads: int = typer.Option(1, min=1, help="torch CPU threads"),
    dense_bits: Optional[int] = typer.Option(None, help="non-expert linears at 8 or 4 bits",
                                             show_default="the checkpoint dtype"),
    bits: Optional[str] = typer.Option(None, help="expert format of the disk store: 8, int4-g32, ternary, ...",
                                       show_default="16: the checkpoint's dtype"),
    ram_memory: Optional[list[str]] = typer.Option(None, help="RAM-tier sizes to cross with the cache sizes, "
                                                   "comma-separated: 100%,50%,25%, 2GiB, auto (needs --store-dir)",
                                                   show_default="no RAM tier"),
    miss: str = typer.Option("auto", help="with --ram-memory: copy, cpu or auto"),
    active_experts: Optional[float] = typer.Option(None, help="LExI: per-layer top-k averaging this fraction of the "
                                                   "model's top-k (0 < F <= 1)", show_default="the model's top-k"),
    low_bit_miss: Optional[str] = typer.Option(None, help="HOBBIT: low-bit copies (int2-g32, ...) computed on a "
                                               "low-weight miss (needs --store-dir)", show_default="none"),
    low_bit_threshold: Optional[float] = typer.Option(None, help="routing weight below which a miss is served "
                                                      "low-bit", show_default="0.25 with --low-bit-miss"),
) -> None:
    """Real decode on this machine: every configuration side by side in one process, alternating, medians."""
    from offload.bench import costmodel as cm
    from offload.model import OffloadedModel

    def go():
        import torch

        torch.set_num_threads(threads)
        sizes = cache_sizes(cache_experts, cache_memory, SIZES)
        pols = split_list(policy) or ["lru"]
        preds = split_list(predictor) or ["none"]
        total, expert_bytes = expert_pool(model_dir)
        opts = {"store": store, "store_dir": str(store_dir) if store_dir else None, "dense_bits": dense_bits,
                "bits": bits_option(bits),
                "active_experts": active_experts, "low_bit_miss": low_bit_miss,
                "low_bit_threshold": low_bit_threshold}
        # the ceiling: every expert resident at full precision (low-bit copies would serve its first misses)
        configs = [("all resident", dict(cache_experts=total, policy="lru", low_bit_miss=None, low_bit_threshold=None))]
        rams = split_list(ram_memory) or [None]
        for c, r, p, pr in itertools.product(sizes, rams, pols, preds):
            slots = min(total, c.slots(total, expert_bytes))
            tier = {} if r is None else {"ram_memory": r, "miss": miss}
            configs.append((f"{c.label} ({slots})" + (f" ram {r} {miss}" if r else "") + f" {p} {pr}",
                            dict(cache_experts=slots, policy=p, **tier,
                                 predictor=None if pr == "none" else pr, lookahead=lookahead)))
        models = []
        with out.status("loading configurations ..."):
            for name, o in configs:
                models.append(OffloadedModel.from_pretrained(model_dir, **{**opts, **o}))
        try:
            ids = prompt_ids(models[0], prompt, prompt_tokens)
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
        prof = sorted(profs, key=lambda p: cm.local_decode_seconds(shape, p, 1.0, fmt=fmt, tier=tier,
                                                                            config=config))[len(profs) // 2]
        base = rows[0]["tok_s"]
        t = Table(title=f"measured decode on this machine: {model_dir.name}, {max_new_tokens} new tokens, "
                        f"median of {repeats}, store={tier}")
        for col in ("config", "tok/s", "vs resident", "hit rate", "RAM hits", "CPU-computed", "KB/token", "stall ms/tok", "prefetch useful/issued",
                    "cost model tok/s", "model error"):
            t.add_column(col, justify="left" if col == "config" else "right")
        for r in rows:
            t.add_row(r["config"], f"{r['tok_s']:.1f}", f"{r['tok_s'] / base:.2f}x", f"{r['hit_rate']:.1%}",
                      f"{r['ram_hit_rate']:.1%}", f"{r['cpu_share']:.1%}",
                      f"{r['bytes_per_token'] / 1e3:.1f}", f"{r['stall_ms_per_token']:.2f}",
                      f"{r['prefetch_useful']:.0f}/{r['prefetch_issued']:.0f}", f"{r['predicted_tok_s']:.1f}",
                      f"{100 * r['predicted_error']:+.0f}%")
        out.print(t)
        out.print(f"cost model (offload.bench.costmodel.local_decode_seconds, {fmt} experts, {tier} tier, at the measured hit "
                  f"rate, median over {len(profs)} calibrations), calibrated on microbenchmarks, not on these runs; "
                  f"median calibration: {prof.describe()}", highlight=False)
        if json_path is not None:
            profiles = [{**vars(p), "gemv_s": {f"{n}x{k}": v for (n, k), v in (p.gemv_s or {}).items()}}
                        for p in profs]
            json_path.write_text(json.dumps({"model": str(model_dir), "local": prof.describe(),
                                             "profiles": profiles, "rows": rows}, indent=1, default=str))

    guard(go)


def register(app: typer.Typer) -> None:
    app.command("run")(run)
