"""offload-bench predictors / prefetch: how well each expert predictor guesses, and what prefetch buys.

  offload-bench predictors MODEL_DIR --max-new-tokens 64 --lookahead 1,2,3 --width 2 --json pred.json
  offload-bench prefetch MODEL_DIR --store-dir D --capacity 0.25,0.5 --predictor none,gate,oracle --lookahead 0,1

`predictors` generates greedily (as many experts resident as memory allows) with the engine's predictor
replaced by a scorer that runs every predictor under test on the same forward passes, without prefetching
anything (so generation is exactly the model's). Each prediction made inside layer l for a target layer t
is scored when layer t routes in the same step (`PredictorScore`): recall@k = share of the experts t really
selected found in the first k predicted ids. A target a predictor says nothing about scores recall 0 (nothing
would be prefetched). Decode steps (one token) are the headline; prefill passes are scored separately over the
whole predicted list.
The oracle replays a routing trace recorded by a first pass over the same prompt: its recall must be 1.0.

`prefetch` is `offload-bench run` with lists of lookaheads, on the disk tier, where every miss is a read from
the device: the store is read with O_DIRECT (the engine's default), or with `--no-direct-io` buffered, its
pages dropped from the OS page cache (posix_fadvise DONTNEED) before every timed generation and, by default,
after every record read. Dropping only the record read leaves the kernel's readahead of its neighbours in
the page cache, so buffered numbers are warmer than a cold disk. `--predictor oracle` prefetches the routing
recorded for the same decode: what a perfect predictor at that lookahead would buy on this machine. With
`none`, a second identical no-prefetch configuration runs as a control: its ratio is the run's noise floor.

`register(app)` adds both subcommands to an existing typer app (offload-bench).
"""
from __future__ import annotations

import json
import random
import statistics
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

out = Console()

DEFAULT_PROMPTS = [
    "The king looked out over the city and said that the night was long.",
    "She opened the letter slowly, for she knew that it would bring bad news.",
    "My lord, the soldiers are tired and hungry, and the enemy is near the gates.",
    "What is love, if it cannot forgive the faults of those we hold most dear?",
]
PREDICTOR_NAMES = ("gate", "previous", "frequency", "oracle")


def _ints(values: Optional[list[str]], default: str) -> list[int]:
    from offload.bench import _split

    raw = _split(values) or default.split(",")
    try:
        got = [int(v) for v in raw]
    except ValueError:
        raise ValueError(f"cannot read {raw} as whole numbers") from None
    if any(not 0 <= d <= 8 for d in got):
        raise ValueError(f"lookahead must be between 0 and 8, got {got}")
    return list(dict.fromkeys(got))


def _texts(prompt: Optional[list[str]], prompts: Optional[Path]) -> list[str]:
    texts = list(prompt or [])
    if prompts is not None:
        if not prompts.exists():
            raise FileNotFoundError(f"prompts file {prompts} does not exist")
        texts += [line.strip() for line in prompts.read_text().splitlines() if line.strip()]
    return texts or list(DEFAULT_PROMPTS)


# --- scoring -----------------------------------------------------------------------------------------
class ScoringPredictor:
    """Stands in for the engine's predictor: runs every predictor in `entries`, prefetches nothing, and scores
    each prediction against the experts the target layer selects later in the same forward pass."""

    def __init__(self, entries: dict, moe_layers: list[int], num_experts: int, width: int) -> None:
        from predictors import PredictorScore

        self.entries, self.num_experts = entries, num_experts
        self.position = {layer: i for i, layer in enumerate(moe_layers)}
        self.decode = {n: PredictorScore(k=width, num_experts=num_experts) for n in entries}
        self.prefill = {n: PredictorScore(k=None, num_experts=num_experts) for n in entries}
        self.distance = {n: PredictorScore(k=width, num_experts=num_experts) for n in entries}  # decode, by d
        self.seconds = dict.fromkeys(entries, 0.0)
        self.calls = dict.fromkeys(entries, 0)
        self._pending: dict[int, list] = {}

    def enter(self, layer: int, hidden):
        """Lookahead-0 entries predict here, at the layer's entry (see `predictors.base`)."""
        self._ask(layer, hidden, entry=True)

    def attended(self, layer: int, out) -> None:
        """A decoder layer's attention output, for the lookahead-0 entries that use it."""
        for p in self.entries.values():
            if getattr(p, "entry", False) and hasattr(p, "attended"):
                p.attended(layer, out)

    def predict(self, layer: int, hidden):
        self._ask(layer, hidden, entry=False)
        return {}

    def _ask(self, layer: int, hidden, entry: bool) -> None:
        T = int(hidden.reshape(-1, hidden.shape[-1]).shape[0])
        for name, p in self.entries.items():
            if getattr(p, "entry", False) != entry:
                continue
            t0 = time.perf_counter()
            wanted = p.predict(layer, hidden)
            self.seconds[name] += time.perf_counter() - t0
            self.calls[name] += 1
            for t in p.targets(layer):
                d = self.position[t] - self.position[layer]
                self._pending.setdefault(t, []).append((name, T == 1, d, wanted.get(t, [])))

    def observe(self, layer: int, experts) -> None:
        actual = experts.reshape(-1).tolist()
        for name, decode, d, ids in self._pending.pop(layer, []):
            if decode:
                self.decode[name].update(layer, ids, actual)
                self.distance[name].update(d, ids, actual)
            else:
                self.prefill[name].update(layer, ids, actual)
        for p in self.entries.values():
            p.observe(layer, experts)

    def reset(self) -> None:
        self._pending.clear()
        for p in self.entries.values():
            p.reset()

    def results(self) -> dict:
        res = {}
        for n in self.entries:
            dec, pre, dist = self.decode[n], self.prefill[n], self.distance[n]
            res[n] = {"decode": {"recall": dec.recall(), "precision": dec.precision(),
                                 "updates": sum(dec.updates.values()), "per_layer": dec.per_layer(),
                                 "per_distance": dist.per_layer()},
                      "prefill": {"recall": pre.recall(), "precision": pre.precision(),
                                  "updates": sum(pre.updates.values()), "per_layer": pre.per_layer()},
                      "predict_us_per_call": 1e6 * self.seconds[n] / max(self.calls[n], 1)}
        return res


def score_predictors(model_dir: Path, texts: list[str], max_new_tokens: int, lookaheads: list[int],
                     width: Optional[int], names=PREDICTOR_NAMES, prompt_tokens: int = 32) -> dict:
    """{"rows": {name: {lookahead: results}}, ...} for every predictor in `names` at every lookahead."""
    import torch

    from offload.bench import _prompt_ids
    from offload.layer_entry import hook_attention_outputs, hook_layer_entries
    from offload.model import OffloadedModel
    from predictors import OraclePredictor, find_routers, make_predictor

    # as many experts resident as memory allows (all, for a model that fits): predictions never depend on it
    model = OffloadedModel.from_pretrained(model_dir, trace=True)
    try:
        e = model.engine
        E, k, layers = e.num_experts, e.top_k, e.moe_layers
        w = k if width is None else width
        if not k <= w <= E:
            raise ValueError(f"--width must be in [top_k, num_experts] = [{k}, {E}], got {w}")
        routers = find_routers(model.model)
        online = [n for n in names if n != "oracle"]
        entries = {(n, d): make_predictor(n, routers=routers, moe_layers=layers, num_experts=E, top_k=k,
                                          lookahead=d, width=w)
                   for n in online for d in lookaheads}
        gen = dict(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
        scorer = None
        enter = lambda layer, h: scorer.enter(layer, h) if scorer and e.predictor is scorer else None  # noqa: E731
        attended = lambda layer, o: scorer.attended(layer, o) if scorer and e.predictor is scorer else None  # noqa: E731
        hooks = hook_layer_entries(model.model, layers, enter) + hook_attention_outputs(model.model, layers, attended)
        tokens = decode_steps = 0
        for i, text in enumerate(texts):
            ids = _prompt_ids(model, text, prompt_tokens, seed=i)
            mask = torch.ones_like(ids)
            e.predictor = None
            e.tracer.reset()
            first = model.generate(ids, attention_mask=mask, **gen)          # pass 1: the routing, for the oracle
            trace = model.trace()
            current = dict(entries)
            if "oracle" in names:
                for d in lookaheads:
                    current[("oracle", d)] = OraclePredictor(trace.experts, layers, E, k, lookahead=d)
            if scorer is None:
                scorer = ScoringPredictor({f"{n}@{d}": p for (n, d), p in current.items()}, layers, E, w)
            else:  # same predictor objects for the online ones; a fresh oracle per prompt
                scorer.entries = {f"{n}@{d}": p for (n, d), p in current.items()}
            scorer.reset()
            e.predictor = scorer
            e.tracer.reset()
            second = model.generate(ids, attention_mask=mask, **gen)         # pass 2: scored, same tokens
            if not torch.equal(first, second):
                raise RuntimeError("the scored pass generated different tokens from the plain one")
            tokens += second.shape[1] - ids.shape[1]
            decode_steps += second.shape[1] - ids.shape[1] - 1
        e.predictor = None
        res = scorer.results()
        for h in hooks:
            h.remove()
    finally:
        model.close()
    rows: dict = {}
    for key, r in res.items():
        n, d = key.rsplit("@", 1)
        rows.setdefault(n, {})[int(d)] = r
    return {"model": str(model_dir), "prompts": len(texts), "new_tokens": tokens, "decode_steps": decode_steps,
            "width": w, "top_k": k, "num_experts": E, "moe_layers": layers, "lookaheads": lookaheads, "rows": rows}


def _print_predictors(r: dict) -> None:
    ls = r["lookaheads"]
    t = Table(title=f"predictor recall@{r['width']} on decode steps ({r['decode_steps']} steps, {r['prompts']} "
                    f"prompts; {len(r['moe_layers'])} MoE layers x {r['num_experts']} experts, top-{r['top_k']})")
    t.add_column("predictor")
    for d in ls:
        t.add_column(f"d={d}\nall targets", justify="right")
        t.add_column(f"d={d}\nat distance {d}", justify="right")
    t.add_column("prefill\n(whole list)", justify="right")
    t.add_column("predict\nus/call", justify="right")
    for n, by_d in r["rows"].items():
        cells = []
        for d in ls:
            x = by_d[d]["decode"]
            cells += [f"{x['recall']:.3f}", f"{x['per_distance'].get(d, float('nan')):.3f}"]
        pre = by_d[ls[0]]["prefill"]
        cells.append(f"{pre['recall']:.3f}" if pre["updates"] else "-")
        cells.append(f"{statistics.mean(by_d[d]['predict_us_per_call'] for d in ls):.0f}")
        t.add_row(n, *cells)
    out.print(t)
    layers = r["moe_layers"] if 0 in ls else r["moe_layers"][1:]  # only d=0 predicts the first MoE layer
    t = Table(title=f"decode recall@{r['width']} per target layer (predictions made at layers t-d..t-1; d=0: at "
                    "layer t's entry, before attention)")
    t.add_column("predictor")
    for layer in layers:
        t.add_column(f"layer {layer}", justify="right")
    for n, by_d in r["rows"].items():
        for d in ls:
            pl = by_d[d]["decode"]["per_layer"]
            t.add_row(f"{n} d={d}", *(f"{pl[layer]:.3f}" if layer in pl else "-" for layer in layers))
    out.print(t)


def predictors_command(
    model_dir: Path = typer.Argument(..., help="Hugging Face checkpoint directory"),
    prompt: Optional[list[str]] = typer.Option(None, "--prompt", "-p", help="a prompt (repeatable)"),
    prompts: Optional[Path] = typer.Option(None, help="a text file, one prompt per line"),
    max_new_tokens: int = typer.Option(64, min=2),
    lookahead: Optional[list[str]] = typer.Option(None, help="lookaheads, comma-separated [default: 1,2,3]"),
    width: Optional[int] = typer.Option(None, help="k of recall@k: predicted experts per target layer "
                                                   "[default: the model's top-k]"),
    predictor: Optional[list[str]] = typer.Option(None, help="predictors [default: gate,previous,frequency,oracle]"),
    prompt_tokens: int = typer.Option(32, min=1, help="random prompt length when the model has no tokenizer"),
    json_path: Optional[Path] = typer.Option(None, "--json", help="write the results as JSON"),
    threads: int = typer.Option(1, min=1, help="torch CPU threads"),
) -> None:
    """Recall@k of every expert predictor at every lookahead, measured while the real model decodes."""
    from offload.bench import _guard, _split

    def go():
        import torch

        torch.set_num_threads(threads)
        names = _split(predictor) or list(PREDICTOR_NAMES)
        bad = [n for n in names if n not in PREDICTOR_NAMES]
        if bad:
            raise ValueError(f"unknown predictor(s) {bad}; choose from {', '.join(PREDICTOR_NAMES)}")
        if not model_dir.exists():
            raise FileNotFoundError(f"model directory {model_dir} does not exist")
        with out.status("generating and scoring ..."):
            r = score_predictors(model_dir, _texts(prompt, prompts), max_new_tokens, _ints(lookahead, "1,2,3"),
                                 width, names, prompt_tokens)
        _print_predictors(r)
        if json_path is not None:
            json_path.write_text(json.dumps(r, indent=1))

    _guard(go)


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
    from offload.bench import _timed

    def timed(m):
        store = model.engine.store
        if uncached and store.tier == "disk" and not store.direct:  # direct reads never fill the page cache
            store.drop_cached()
        return _timed(model, ids, m, cold=True)

    t1, s1 = timed(1)
    tn, sn = timed(n + 1)
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
    capacity: Optional[list[str]] = typer.Option(None, help="cache sizes: fractions or slot counts "
                                                 "[default: 0.25,0.5]"),
    predictor: Optional[list[str]] = typer.Option(None, help="predictors, oracle included (the recorded routing: "
                                                  "the ceiling) [default: none,previous,gate]"),
    lookahead: Optional[list[str]] = typer.Option(None, help="lookaheads for every predictor but none [default: 1,2]"),
    policy: str = typer.Option("lru", help="eviction policy"),
    width: Optional[int] = typer.Option(None, help="prefetch width (experts per predicted layer) [default: top-k]"),
    min_precision: Optional[list[str]] = typer.Option(None, help="prefetch_min_precision values for every predictor "
                                                      "but none [default: the engine's]"),
    direct_io: bool = typer.Option(True, help="read the store with O_DIRECT (--no-direct-io: buffered reads)"),
    uncached: bool = typer.Option(True, help="buffered reads: drop the store's pages from the OS page cache after "
                                             "every read (--no-uncached: misses may be served from the page cache)"),
    max_new_tokens: int = typer.Option(32, min=1),
    repeats: int = typer.Option(3, min=1),
    prompt: Optional[str] = typer.Option(None, help="prompt text [default: an English sentence]"),
    json_path: Optional[Path] = typer.Option(None, "--json", help="write the rows as JSON"),
    threads: int = typer.Option(1, min=1, help="torch CPU threads"),
) -> None:
    """Real decode from the disk tier: no prefetch vs each predictor and lookahead, side by side, medians."""
    from cache.simulate import slots_for
    from offload.bench import (_capacities, _guard, _label, _prompt_ids, _split, _total_experts, loader_for,
                               measure_decode)
    from offload.model import OffloadedModel

    def go():
        import torch

        torch.set_num_threads(threads)
        caps = _capacities(capacity, "0.25,0.5")
        preds = _split(predictor) or ["none", "previous", "gate"]
        bad = [n for n in preds if n not in ("none", *PREDICTOR_NAMES)]
        if bad:
            raise ValueError(f"unknown predictor(s) {bad}; choose from none, {', '.join(PREDICTOR_NAMES)}")
        looks = _ints(lookahead, "1,2")
        try:
            floors = [float(x) for x in _split(min_precision)] or [None]
        except ValueError:
            raise ValueError(f"--min-precision takes numbers in [0, 1] like 0.5,0.75, got {min_precision}") from None
        total = _total_experts(model_dir)
        opts = {"store": "disk", "store_dir": str(store_dir), "policy": policy, "prefetch_width": width,
                "direct_io": direct_io}
        configs = [("all resident", dict(cache_experts=total), None)]
        for c in caps:
            slots = min(total, slots_for(c, total))
            for pr in preds:
                for d in ([1] if pr == "none" else looks):
                    for p in ([None] if pr in ("none", "oracle") else floors):  # the oracle is never paused
                        name = (f"{_label(c)} ({slots}) {pr}" + ("" if pr == "none" else f" d={d}")
                                + ("" if p is None or len(floors) == 1 else f" p>={p:g}"))
                        # the oracle takes a gate's seat (same hooks, same loader), then replays the routing
                        o = dict(cache_experts=slots, predictor={"none": None, "oracle": "gate"}.get(pr, pr),
                                 lookahead=d)
                        if p is not None:
                            o["prefetch_min_precision"] = p
                        configs.append((name, o, (_label(c), pr)))
                        if pr == "none":  # the same configuration again: this run's noise floor, in its own row
                            configs.append((name + " again (control)", dict(o), (_label(c), "control")))
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
            ids = _prompt_ids(models[0], prompt or DEFAULT_PROMPTS[0], 32)
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

    _guard(go)


def register(app: typer.Typer) -> None:
    """Add `predictors` and `prefetch` to offload-bench."""
    app.command("predictors")(predictors_command)
    app.command("prefetch")(prefetch_command)
