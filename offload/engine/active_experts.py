"""LExI: a top-k of its own for each MoE layer, chosen from the weights alone.

`measure_damage` runs the model once on fixed random token ids (no data), and for each MoE layer sends the
inputs it saw through its router and stored experts, measuring how much the routed output changes, relative
to the residual stream, when only the first k' < k of the router's choices are kept. A budget of
FRACTION * k * layers expert evaluations per token is then spent greedily: starting from k everywhere, one
expert at a time is taken from the layer where that costs the least damage, each layer keeping at least one.
`trim` applies it to transformers' routing result; routing itself is never re-implemented.

Per architecture (`ROUTING`, read from transformers' routers): whether top-k comes sorted by score, and what
the kept weights must sum to where the router normalises its top-k (None: it does not; keep them as they are).
Idea: LExI (layer-adaptive active experts: a per-layer top-k found without data), issue #19.

Legend: N random tokens, H hidden size, k the model's top-k, k' a layer's kept experts.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from offload.engine.experts import expert_ffn
from offload.engine.slots import SlotPool
from offload.errors import OffloadError
from offload.store.disk import aligned_buffer

SAMPLES = 256          # random token ids in the one measuring forward (at most the model's context)
SEED = 0
CACHE = "active_experts.json"  # the damage table, kept in a disk store's directory (a ram store measures per load)
CACHE_VERSION = 1
_DECODER_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)$")


@dataclass(frozen=True)
class Routing:
    """How one architecture's router hands over its top-k."""

    by_score: bool          # columns come sorted by score (torch.topk sorted=True): keep the first k'
    total: float | None     # the top-k weights are normalised to sum to this; None: not normalised


def _norm_flag(total_if_set: float = 1.0):
    return lambda c: Routing(True, total_if_set if c.norm_topk_prob else None)


ROUTING = {
    "mixtral": lambda c: Routing(True, 1.0),             # softmax, top-k, divided by its sum
    "qwen2_moe": _norm_flag(), "qwen3_moe": _norm_flag(), "olmoe": _norm_flag(),  # ... if norm_topk_prob
    "deepseek_v2": lambda c: Routing(False, None),       # topk(sorted=False) of softmax, times the scaling factor
    # topk(sorted=False) of the bias-corrected sigmoid; weights are the plain sigmoid, normalised if
    # norm_topk_prob, then times routed_scaling_factor. Kept by weight: the bias only balances load.
    "deepseek_v3": lambda c: Routing(False, c.routed_scaling_factor if c.norm_topk_prob else None),
    "phimoe": lambda c: Routing(True, None),             # sparsemixer: argmax first, each weight its own softmax
    "granitemoe": lambda c: Routing(True, 1.0),          # softmax over the top-k logits
    "gpt_oss": lambda c: Routing(True, 1.0),             # softmax over the top-k logits
}


def routing_for(hf_config) -> Routing:
    model_type = getattr(hf_config, "model_type", None)
    if model_type in ("llama4", "llama4_text"):
        raise OffloadError("active_experts is not supported for Llama-4 (its router hands every expert every token, "
                           "pre-scaled, and is top-1 anyway); drop active_experts")
    if model_type not in ROUTING:
        raise OffloadError(f"active_experts does not know how {model_type!r} routers order and normalise their top-k; "
                           f"drop active_experts")
    return ROUTING[model_type](hf_config.get_text_config())


def check_active_experts(fraction: float, hf_config, top_k: int) -> None:
    """Refuse, before anything loads, an architecture LExI cannot trim or a fraction below one expert per layer."""
    routing_for(hf_config)
    _check_fraction(fraction, top_k)


def _check_fraction(fraction: float, top_k: int) -> None:
    if fraction * top_k < 1 - 1e-9:
        least = math.ceil(100 / top_k) / 100
        raise OffloadError(f"active_experts={fraction:g} leaves {fraction * top_k:g} of top-{top_k} experts per "
                           f"layer, but every layer keeps at least one; give active_experts={least:g} or more")


class ActiveExperts:
    """Per-layer k (`k[layer]`) and the trim that applies it to a routing result."""

    def __init__(self, k: dict[int, int], top_k: int, routing: Routing, damage: dict[int, list[float]] | None = None):
        self.k, self.top_k, self.routing, self.damage = dict(k), top_k, routing, damage

    # --- applying it -----------------------------------------------------------------------------
    def trim(self, layer: int, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        """transformers' routing [T, k] cut to this layer's k' columns, renormalised where the router normalises."""
        return trim(top_k_index, top_k_weights, self.k[layer], self.routing)

    def per_token(self) -> int:
        """Expert evaluations per token, all layers."""
        return sum(self.k.values())

    def describe(self) -> str:
        ks = " ".join(str(self.k[layer]) for layer in sorted(self.k))
        return f"{self.per_token()} of {self.top_k * len(self.k)} per token; per layer k = {ks}"

    # --- choosing it -----------------------------------------------------------------------------
    @classmethod
    def choose(cls, fraction: float, damage: dict[int, list[float]], top_k: int, routing: Routing) -> ActiveExperts:
        """Spend floor(fraction * k * layers) evaluations greedily by least damage, at least one per layer.
        `damage[layer][j]` is the output change with j + 1 experts kept (0 at j + 1 = k)."""
        _check_fraction(fraction, top_k)
        layers = sorted(damage)
        budget = math.floor(fraction * top_k * len(layers) + 1e-9)
        k = {layer: top_k for layer in layers}
        for _ in range(top_k * len(layers) - budget):
            # the cheapest next removal; ties go to the earlier layer, so the choice is deterministic
            layer = min((layer for layer in layers if k[layer] > 1),
                        key=lambda n: damage[n][k[n] - 2] - damage[n][k[n] - 1])
            k[layer] -= 1
        return cls(k, top_k, routing, damage)

    @classmethod
    def for_model(cls, fraction: float, offloaded, hf_config) -> ActiveExperts:
        """The per-layer k of a loaded OffloadedModel: its damage table from a disk store's cache, else measured
        (which runs the model once: reset its cache afterwards)."""
        engine = offloaded.engine
        routing = routing_for(hf_config)
        path = Path(engine.store.dir) / CACHE if getattr(engine.store, "dir", None) is not None else None
        damage = _read_cache(path, engine.store) if path is not None else None
        if damage is None:
            damage = measure_damage(offloaded, routing)
            if path is not None:
                _write_cache(path, engine.store, damage)
        return cls.choose(fraction, damage, engine.top_k, routing)


def trim(top_k_index: torch.Tensor, top_k_weights: torch.Tensor, k: int, routing: Routing):
    """The k highest-scored of the router's [T, K] choices; weights renormalised to `routing.total` (in fp32)."""
    if k >= top_k_index.shape[1]:
        return top_k_index, top_k_weights
    if routing.by_score:
        index, weights = top_k_index[:, :k], top_k_weights[:, :k]
    else:  # unsorted top-k: the largest weights first, ties in column order
        order = torch.argsort(top_k_weights, dim=-1, descending=True, stable=True)[:, :k]
        index, weights = top_k_index.gather(1, order), top_k_weights.gather(1, order)
    if routing.total is not None:
        w = weights.float()
        w = w / w.sum(dim=-1, keepdim=True)
        weights = (w if routing.total == 1.0 else w * routing.total).to(top_k_weights.dtype)
    return index, weights


# --- measuring the damage ---------------------------------------------------------------------------
@torch.inference_mode()
def measure_damage(offloaded, routing: Routing, samples: int = SAMPLES, seed: int = SEED) -> dict[int, list[float]]:
    """{layer: [change of the routed output with 1..k experts kept, relative to the residual stream it is
    added to]}. One forward of `samples` random token ids supplies each MoE layer's input and stream; the
    experts are then read through the engine's store and codec into a scratch slot (the cache is untouched).

    Relative to the stream, not to the layer's own output: on the demo, top-1 at layer 0 costs +3.2%
    perplexity and at layer 2 +0.02%, yet both lose ~70% of their own output on Gaussian inputs; the stream
    is what the change is added to, and it is small at layer 0 (measured: docs/formats.md, LExI)."""
    from predictors import find_routers

    model, engine = offloaded.model, offloaded.engine
    experts = {mod.layer_idx: mod for mod in model.modules()
               if getattr(mod, "layer_idx", None) is not None and hasattr(mod, "engine")}
    decoder = {int(m.group(1)): mod for name, mod in model.named_modules() if (m := _DECODER_LAYER.search(name))}
    inputs, streams, hooks = {}, {}, []
    for layer, mod in experts.items():
        hooks.append(mod.register_forward_pre_hook(lambda _m, args, layer=layer: inputs.__setitem__(layer, args[0])))
        norm = getattr(decoder.get(layer), "post_attention_layernorm", None)  # its input is the stream
        if norm is not None:
            hooks.append(norm.register_forward_pre_hook(
                lambda _m, args, layer=layer: streams.__setitem__(layer, float(args[0].float().norm()))))
    config = model.config.get_text_config()
    n = min(samples, getattr(config, "max_position_embeddings", samples) or samples)
    ids = torch.randint(0, config.vocab_size, (1, n), generator=torch.Generator().manual_seed(seed))
    try:
        offloaded(ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    routers = find_routers(model)
    reader = _ExpertReader(engine)
    damage = {}
    for layer in engine.moe_layers:
        x = inputs[layer].reshape(-1, inputs[layer].shape[-1])                     # [N, H]
        _logits, weights, index = routers[layer].forward(x)                        # [N, k] each
        index = index.long()
        outs = torch.zeros(*index.shape, x.shape[1], dtype=torch.float32, device=x.device)  # [N, k, H]
        for e in index.unique().tolist():
            rows, cols = torch.where(index == e)
            outs[rows, cols] = reader.ffn(experts[layer], (layer, e), x[rows]).float()
        scale = streams.get(layer) or float(x.float().norm())  # no norm found: relative to the layer's input
        full, changes = None, []
        for kk in range(engine.top_k, 0, -1):
            i, w = trim(index, weights, kk, routing)
            cols = _columns(index, i)                                                # [N, kk]
            y = (outs.gather(1, cols[..., None].expand(-1, -1, x.shape[1])) * w.float()[..., None]).sum(1)  # [N, H]
            full = y if full is None else full
            changes.append(float((y - full).norm()) / max(scale, 1e-30))
        damage[layer] = changes[::-1]
    return damage


def _columns(index: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """For each kept expert id [N, k'], its column in the full routing `index` [N, k]."""
    return (kept[..., None] == index[:, None, :]).int().argmax(-1)


class _ExpertReader:
    """One expert at a time from the store into a scratch slot, in the resident form the engine computes on."""

    def __init__(self, engine) -> None:
        self.store, self.codec = engine.store, engine.codec
        self.pool = SlotPool(1, engine.slots.record_bytes, engine.slots.device)
        direct = self.codec is None and self.pool.device.type == "cpu"
        self.scratch = None if direct else aligned_buffer(self.store.buffer_bytes)

    def ffn(self, module: nn.Module, key, x: torch.Tensor) -> torch.Tensor:
        slot = self.pool.raw(0)
        if self.scratch is None:
            self.store.read_into(key, slot)
        else:
            self.store.read_into(key, self.scratch)
            if self.codec is None:
                slot[: self.store.record_bytes].copy_(self.scratch[: self.store.record_bytes])
            else:
                self.codec.transform(self.store.format_of(key), self.scratch, slot)
        if self.codec is None:
            return expert_ffn(module, self.pool.views(0, self.store.layout_of(key)), x)
        kind = self.store.format_of(key)
        return expert_ffn(module, self.codec.views(self.pool, 0, kind), x, self.codec.kind_named(kind).linear)


# --- the cache next to a disk store -----------------------------------------------------------------
def _cache_key(store) -> dict:
    return {"version": CACHE_VERSION, "samples": SAMPLES, "seed": SEED,
            "store": {k: store.index.get(k) for k in ("fingerprint", "settings")}}


def _read_cache(path: Path, store) -> dict[int, list[float]] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("key") != json.loads(json.dumps(_cache_key(store), default=str)):
        return None
    return {int(layer): [float(v) for v in values] for layer, values in data["damage"].items()}


def _write_cache(path: Path, store, damage: dict[int, list[float]]) -> None:
    try:
        path.write_text(json.dumps({"key": _cache_key(store), "damage": damage}, indent=1, default=str))
    except OSError:  # a read-only store still works: the table is measured again next time
        pass
