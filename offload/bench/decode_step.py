"""offload-bench decode-step: what the engine adds to one MoE layer at one decode token, over the bare kernels.

Per MoE layer, with every expert resident: (a) `Engine.run_layer` on the layer's real inputs of one decode
token, (b) the floor: the same experts computed by bare torch (the same slot views and kernel calls, the
weights and the combine set up beforehand), and (a) - (b), the engine's own work. Both are timed in
alternating rounds in one process (medians), so a shared machine's load hits them alike. Also what
transformers' `generate()` adds per token over a manual decode loop. The timing functions use only what
the engine has had since before its token path, so an older checkout can be measured with them too.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
import typer
from torch import nn

DEMO_MODEL = Path(__file__).parent / "demo_model"


# generate() greedy as users call it; as `offload-bench run` times it (min_new_tokens: exactly n tokens); with a
# static KV cache, which transformers offers to cut per-token work. No repetition penalty (the demo's generation
# config has one), so that each can decode the manual loop's tokens.
_GREEDY = {"exact": False, "repetition_penalty": 1.0}
GENERATE_VARIANTS = {"generate()": _GREEDY, "generate(min_new_tokens)": {**_GREEDY, "exact": True},
                     "generate(static cache)": {**_GREEDY, "cache_implementation": "static"}}


@dataclass
class LayerCall:
    """One MoE layer's inputs at one decode token, as the offloaded experts module hands them to the engine."""

    module: nn.Module
    hidden: torch.Tensor
    top_k_index: torch.Tensor
    top_k_weights: torch.Tensor


def prompt_ids(model, n: int = 16) -> torch.Tensor:
    """A fixed random prompt [1, n] within the model's vocabulary."""
    vocab = model.model.config.get_text_config().vocab_size
    return torch.randint(3, min(500, vocab), (1, n), generator=torch.Generator().manual_seed(0))


@torch.inference_mode()
def capture(model, ids: torch.Tensor) -> list[LayerCall]:
    """The inputs of every MoE layer at the first decode token after prompt `ids`."""
    engine, hf = model.engine, model.model
    out = hf(ids, use_cache=True)
    calls: list[LayerCall] = []
    run_layer = engine.run_layer

    def record(module, hidden, top_k_index, top_k_weights):
        if top_k_index is None:
            raise ValueError("decode-step measures top-k routed experts; this model hands every token to every "
                             "expert (Llama-4)")
        calls.append(LayerCall(module, hidden.clone(), top_k_index.clone(), top_k_weights.clone()))
        return run_layer(module, hidden, top_k_index, top_k_weights)

    engine.run_layer = record  # the experts modules call engine.run_layer: an instance attribute wins
    try:
        hf(out.logits[:, -1:].argmax(-1), cache=out.cache, use_cache=True)
    finally:
        del engine.run_layer
    return calls


def _bare_linear(views, name: str, transposed: bool, quantized: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """x [1, K] (the model dtype) -> x @ W.T with the kernel the engine ends up calling, and nothing else."""
    if not quantized:
        w = views[name]
        return (lambda x: x @ w) if transposed else (lambda x: F.linear(x, w))
    r = views[name]
    if "weight" in r:  # a GPU's resident form: dense bf16
        w = r["weight"]
        return lambda x: F.linear(x, w)
    if "scales" in r:
        qweight, scales = r["qweight"], r["scales"]
        return lambda x: torch.ops.aten._weight_int8pack_mm(x, qweight, scales)
    qweight, qsz = r["qweight"], r["qsz"]
    group = 2 * qweight.shape[1] // qsz.shape[0]
    return lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, qweight, group, qsz)


def floor(model, call: LayerCall) -> Callable[[], torch.Tensor]:
    """The layer of `call` in bare torch, everything but the kernels and the combine done beforehand: per
    chosen expert (ascending ids) gate_up, the model's own gate, down, `y * weight`, an add into zeros (the
    one-row index_add_). Its experts must be resident."""
    engine, module, x = model.engine, call.module, call.hidden
    quantized = engine.codec is not None
    if quantized and x.dtype != torch.bfloat16:
        raise ValueError(f"the CPU quantized kernels take bf16 activations; load the model in bf16, not {x.dtype}")
    transposed = getattr(module, "is_transposed", False)
    bias = getattr(module, "has_bias", False)
    ids = call.top_k_index.tolist()[0]
    experts = []
    for e, p in sorted(zip(ids, range(len(ids)))):
        weight = call.top_k_weights[:, p:p + 1]  # [1, 1], as eager indexes it
        key = (module.layer_idx, e)
        slot = engine.cache.slot(key)
        if slot is None:
            raise ValueError(f"expert {key} is not resident; decode-step needs every expert resident")
        w, _ = engine._views(key, slot)
        experts.append((_bare_linear(w, "gate_up", transposed, quantized),
                        _bare_linear(w, "down", transposed, quantized), w.get("gate_up_bias"), w.get("down_bias"),
                        weight))
    gate = module._apply_gate

    def run() -> torch.Tensor:
        final = torch.zeros_like(x)
        for gate_up, down, b1, b2, weight in experts:
            y = gate_up(x)
            if bias:
                y = y + b1
            y = down(gate(y))
            if bias:
                y = y + b2
            y = y * weight
            final.add_(y if y.dtype == final.dtype else y.to(final.dtype))
        return final

    return run


def _per_layer_us(fn: Callable[[], object], layers: int, passes: int, clock: Callable[[], float]) -> float:
    t0 = clock()
    for _ in range(passes):
        fn()
    return (clock() - t0) / (passes * layers) * 1e6


@torch.inference_mode()
def engine_overhead(model, calls: list[LayerCall], rounds: int = 15, passes: int = 40,
                    clock: Callable[[], float] = time.perf_counter) -> dict:
    """Per-layer µs of the engine's run_layer, of the floor, and of their difference (median of the per-round
    differences), over all of `calls` in order; `bit_equal`: the floor computes exactly what the engine does.
    `clock=time.thread_time` counts this thread's CPU time only: on a shared machine the time spent waiting
    for a core stays out (cache and memory contention do not)."""
    engine = model.engine
    floors = [floor(model, c) for c in calls]
    args = [(c.module, c.hidden, c.top_k_index, c.top_k_weights) for c in calls]
    bit_equal = all(torch.equal(engine.run_layer(*a), f()) for a, f in zip(args, floors))

    def run_engine() -> None:
        for a in args:
            engine.run_layer(*a)

    def run_floor() -> None:
        for f in floors:
            f()

    samples: dict[str, list[float]] = {"engine": [], "floor": []}
    for _ in range(2):  # warm
        run_engine(), run_floor()
    for r in range(rounds):
        order = ("engine", "floor") if r % 2 == 0 else ("floor", "engine")
        for name in order:
            samples[name].append(_per_layer_us(run_engine if name == "engine" else run_floor, len(calls), passes,
                                               clock))
    model.reset_stats()  # the timed calls counted hits and tokens
    diffs = [a - b for a, b in zip(samples["engine"], samples["floor"])]
    return {"engine_us": statistics.median(samples["engine"]), "floor_us": statistics.median(samples["floor"]),
            "overhead_us": statistics.median(diffs), "layers": len(calls), "bit_equal": bit_equal,
            "samples": samples}


@torch.inference_mode()
def manual_decode(model, ids: torch.Tensor, n: int, clock: Callable[[], float] = time.perf_counter
                  ) -> tuple[float, list[int]]:
    """Seconds per token of a bare greedy loop (model forward + argmax, n tokens after the prompt's), and its
    tokens."""
    hf = model.model
    out = hf(ids, use_cache=True)
    tok = out.logits[:, -1:].argmax(-1)
    tokens = [int(tok)]
    t0 = clock()
    for _ in range(n):
        out = hf(tok, cache=out.cache, use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
        tokens.append(int(tok))
    return (clock() - t0) / n, tokens


def generate_decode(model, ids: torch.Tensor, n: int, clock: Callable[[], float] = time.perf_counter,
                    exact: bool = True, **kwargs) -> tuple[float, list[int]]:
    """Seconds per decoded token of greedy `model.generate` (n + 1 new tokens minus 1 new token), and its
    tokens. `exact` forces the count with min_new_tokens (what `offload-bench run` times), whose logits
    processors run every step; without it generation may stop early at an end token, and the time is per
    token actually decoded."""
    def timed(k: int) -> tuple[float, list[int]]:
        extra = {"min_new_tokens": k} if exact else {}
        t0 = clock()
        out = model.generate(ids, max_new_tokens=k, do_sample=False, pad_token_id=0,
                             attention_mask=torch.ones_like(ids), **extra, **kwargs)
        return clock() - t0, out[0, ids.shape[1]:].tolist()

    t1, _ = timed(1)
    tn, tokens = timed(n + 1)
    return (tn - t1) / max(len(tokens) - 1, 1), tokens


def generate_overhead(model, ids: torch.Tensor, n: int = 32, rounds: int = 5,
                      variants: dict[str, dict] | None = None) -> dict:
    """{name: {ms, over_manual_ms, same_tokens}}: per decoded token, a manual loop and `generate_decode` with
    each of `variants` (its keyword arguments), alternating rounds, medians. `same_tokens`: the manual loop's
    tokens, as far as that run went."""
    variants = variants or {"generate()": {"exact": False}}
    runs: dict[str, Callable[[], tuple[float, list[int]]]] = {"manual loop": lambda: manual_decode(model, ids, n)}
    for name, kw in variants.items():
        runs[name] = lambda kw=kw: generate_decode(model, ids, n, **kw)
    tokens = {name: run()[1] for name, run in runs.items()}  # warm, and the tokens each produces
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(rounds):
        for name in (list(runs) if r % 2 == 0 else list(reversed(runs))):
            samples[name].append(runs[name]()[0])
    model.reset_stats()
    manual = statistics.median(samples["manual loop"])
    return {name: {"ms": 1e3 * statistics.median(s), "over_manual_ms": 1e3 * (statistics.median(s) - manual),
                   "same_tokens": tokens[name] == tokens["manual loop"][:len(tokens[name])]}
            for name, s in samples.items()}


def decode_step_command(
    model_dir: Optional[Path] = typer.Argument(None, help="Hugging Face checkpoint directory [default: the demo]"),
    bits: str = typer.Option("bf16,int4-g32", help="expert formats, comma-separated (quantized ones need a disk "
                                                    "store, converted into --store-dir)"),
    store_dir: Optional[Path] = typer.Option(None, help="where quantized stores are (or get) converted, one "
                                                        "subfolder per format [default: a temporary folder]"),
    rounds: int = typer.Option(15, min=1, help="alternating rounds (medians)"),
    passes: int = typer.Option(40, min=1, help="passes over all MoE layers per round"),
    tokens: int = typer.Option(32, min=1, help="decoded tokens per generate() round"),
    threads: int = typer.Option(1, min=1, help="torch CPU threads"),
    cpu_time: bool = typer.Option(False, help="time the layers in this thread's CPU time, not wall time (a shared "
                                              "machine's waits for a core stay out; needs --threads 1)"),
) -> None:
    """Engine overhead per MoE layer at one decode token (run_layer minus its bare kernels), and what generate()
    adds per token over a manual loop; every expert resident."""
    from rich.table import Table

    from offload.bench.common import guard, out
    from offload.model import OffloadedModel

    def go():
        if cpu_time and threads != 1:
            raise ValueError("--cpu-time counts this thread only: the kernels' other threads would be left out; "
                             "use --threads 1")
        torch.set_num_threads(threads)
        path = model_dir or DEMO_MODEL
        clock = time.thread_time if cpu_time else time.perf_counter
        formats = [b.strip() for b in bits.split(",") if b.strip()]
        with tempfile.TemporaryDirectory(prefix="decode-step-") as tmp:
            root = store_dir or Path(tmp)
            t = Table(title=f"engine overhead per MoE layer at one decode token: {path.name}, every expert "
                            f"resident, {threads} thread(s), {'CPU' if cpu_time else 'wall'} time, median of "
                            f"{rounds} rounds")
            for col in ("experts", "run_layer µs", "bare kernels µs", "engine overhead µs", "bit-equal"):
                t.add_column(col, justify="left" if col == "experts" else "right")
            gen = None
            for fmt in formats:
                dense = fmt in ("bf16", "16", "dense")
                opts = {} if dense else {"bits": fmt, "store": "disk", "store_dir": str(root / fmt)}
                with OffloadedModel.from_pretrained(path, cache_experts=1 << 30, **opts) as model:
                    ids = prompt_ids(model)
                    r = engine_overhead(model, capture(model, ids), rounds, passes, clock)
                    t.add_row(fmt, f"{r['engine_us']:.1f}", f"{r['floor_us']:.1f}", f"{r['overhead_us']:.1f}",
                              "yes" if r["bit_equal"] else "[red]no[/]")
                    if gen is None:
                        gen = generate_overhead(model, ids, tokens, max(3, rounds // 3), GENERATE_VARIANTS)
            out.print(t)
            g = Table(title=f"per decoded token ({formats[0]} experts, {tokens} tokens, medians)")
            for col in ("loop", "ms/token", "over the manual loop", "same tokens"):
                g.add_column(col, justify="left" if col == "loop" else "right")
            for name, row in gen.items():
                g.add_row(name, f"{row['ms']:.2f}", f"{row['over_manual_ms']:+.2f} ms", "yes" if row["same_tokens"]
                          else "[red]no[/]")
            out.print(g)

    guard(go)


def register(app: typer.Typer) -> None:
    """Add `decode-step` to offload-bench."""
    app.command("decode-step")(decode_step_command)
