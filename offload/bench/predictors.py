"""offload-bench predictors: how well each expert predictor guesses, scored on the same forward passes.

  offload-bench predictors MODEL_DIR --max-new-tokens 64 --lookahead 1,2,3 --width 2 --json pred.json

`predictors` generates greedily (as many experts resident as memory allows) with the engine's predictor
replaced by a scorer that runs every predictor under test on the same forward passes, without prefetching
anything (so generation is exactly the model's). Each prediction made inside layer l for a target layer t
is scored when layer t routes in the same step (`PredictorScore`): recall@k = share of the experts t really
selected found in the first k predicted ids. A target a predictor says nothing about scores recall 0 (nothing
would be prefetched). Decode steps (one token) are the headline; prefill passes are scored separately over the
whole predicted list.
The oracle replays a routing trace recorded by a first pass over the same prompt: its recall must be 1.0.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from offload.bench.common import guard, out, prompt_ids, read_text_file, split_list
DEFAULT_PROMPTS = [
    "The king looked out over the city and said that the night was long.",
    "She opened the letter slowly, for she knew that it would bring bad news.",
    "My lord, the soldiers are tired and hungry, and the enemy is near the gates.",
    "What is love, if it cannot forgive the faults of those we hold most dear?",
]
PREDICTOR_NAMES = ("gate", "previous", "frequency", "oracle")


def lookaheads(values: Optional[list[str]], default: str) -> list[int]:

    raw = split_list(values) or default.split(",")
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
        texts += [line.strip() for line in read_text_file(prompts, "prompts file").splitlines() if line.strip()]
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

    from offload.engine.hooks import hook_attention_outputs, hook_layer_entries
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
            ids = prompt_ids(model, text, prompt_tokens, seed=i)
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
    prompt: Optional[list[str]] = typer.Option(None, "--prompt", "-p", help="a prompt (repeatable)",
                                               show_default="the built-in English prompts"),
    prompts: Optional[Path] = typer.Option(None, help="a text file, one prompt per line", show_default="none"),
    max_new_tokens: int = typer.Option(64, min=2, help="tokens decoded per prompt"),
    lookahead: Optional[list[str]] = typer.Option(None, help="lookaheads, comma-separated", show_default="1,2,3"),
    width: Optional[int] = typer.Option(None, help="k of recall@k: predicted experts per target layer",
                                        show_default="the model's top-k"),
    predictor: Optional[list[str]] = typer.Option(None, help="predictors, comma-separated",
                                                  show_default=",".join(PREDICTOR_NAMES)),
    prompt_tokens: int = typer.Option(32, min=1, help="random prompt length when the model has no tokenizer"),
    json_path: Optional[Path] = typer.Option(None, "--json", help="write the results as JSON", show_default="no file"),
    threads: int = typer.Option(1, min=1, help="torch CPU threads"),
) -> None:
    """Recall@k of every expert predictor at every lookahead, measured while the real model decodes."""

    def go():
        import torch

        torch.set_num_threads(threads)
        names = split_list(predictor) or list(PREDICTOR_NAMES)
        bad = [n for n in names if n not in PREDICTOR_NAMES]
        if bad:
            raise ValueError(f"unknown predictor(s) {bad}; choose from {', '.join(PREDICTOR_NAMES)}")
        if not model_dir.exists():
            raise FileNotFoundError(f"model directory {model_dir} does not exist")
        with out.status("generating and scoring ..."):
            r = score_predictors(model_dir, _texts(prompt, prompts), max_new_tokens, lookaheads(lookahead, "1,2,3"),
                                 width, names, prompt_tokens)
        _print_predictors(r)
        if json_path is not None:
            json_path.write_text(json.dumps(r, indent=1))

    guard(go)


def register(app: typer.Typer) -> None:
    app.command("predictors")(predictors_command)
