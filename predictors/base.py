"""The Predictor protocol and the shared plumbing of the predictors (the registry is in `predictors/__init__`).

A predictor is asked, inside MoE layer `layer` and before that layer's experts run, which experts the next
MoE layers will want, so that their bytes can be fetched while this layer computes:

    predict(layer, hidden[T, H]) -> {target_layer: [expert ids, best first]}
    observe(layer, experts[T, k])   # what the router really chose at `layer` this step
    reset()                         # a new sequence starts

Layers are the model's own layer indices. MoE layers can be a subset (DeepSeek's first dense layers,
Qwen2-MoE's `mlp_only_layers`, Llama-4's `moe_layers`); "the next d layers" always means the next d
*MoE* layers. This package imports torch and never `offload` or `cache`.

Lookahead 0 (`entry` is True) moves the question earlier in the same layer: predict is asked at the entry
of the decoder layer holding MoE layer `layer`, with the residual stream entering it (hidden [B, T, H],
before attention), and its one target is `layer` itself. The attention block's compute is the lead time.
"""
from __future__ import annotations

import bisect
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class Predictor(Protocol):
    def predict(self, layer: int, hidden: Tensor) -> dict[int, list[int]]:
        """Ranked expert ids (best first) per target MoE layer after `layer`; {} = no prediction."""
        ...

    def observe(self, layer: int, experts: Tensor) -> None:
        """The experts selected at `layer` this step, int [T, k]; ids outside [0, num_experts) are padding."""
        ...

    def reset(self) -> None:
        """Forget per-sequence state (a new sequence starts)."""
        ...


def valid_ids(experts: Tensor, num_experts: int) -> Tensor:
    """The ids of `experts` (any shape) that are real experts, flattened; padding (< 0 or >= E) dropped."""
    flat = torch.as_tensor(experts).reshape(-1).long()
    return flat[(flat >= 0) & (flat < num_experts)]


def rank_by_count(experts: Tensor, num_experts: int, score: Tensor | None = None) -> list[int]:
    """Distinct valid ids of `experts`, most frequent first; ties by higher `score` [E], then lower id."""
    ids = valid_ids(experts, num_experts)
    if ids.numel() == 0:
        return []
    counts = torch.zeros(num_experts, dtype=torch.int64, device=ids.device)
    counts.scatter_add_(0, ids, torch.ones_like(ids))
    order = torch.arange(num_experts, device=ids.device)
    if score is not None:
        order = torch.argsort(score.to(ids.device), descending=True, stable=True)
    order = order[torch.argsort(counts[order], descending=True, stable=True)]
    return order[: int((counts > 0).sum())].tolist()


def column_score(ids: Tensor, num_experts: int) -> Tensor:
    """Per expert, the sum over rows of (k - column) of `ids` [T, k]: earlier columns are the router's better picks."""
    w = torch.arange(ids.shape[-1], 0, -1, device=ids.device).expand_as(ids)
    keep = (ids >= 0) & (ids < num_experts)
    score = torch.zeros(num_experts, dtype=torch.int64, device=ids.device)
    return score.scatter_add_(0, ids[keep].long(), w[keep])


class BasePredictor:
    """Shared state: the MoE layers in order, expert count, top-k, lookahead, and target-layer lookup."""

    name = "base"

    def __init__(self, moe_layers: list[int], num_experts: int, top_k: int, lookahead: int = 1,
                 width: int | None = None):
        layers = sorted({int(x) for x in moe_layers})
        if not layers:
            raise ValueError("moe_layers is empty")
        if num_experts < 1 or not 1 <= top_k <= num_experts:
            raise ValueError(f"need 1 <= top_k <= num_experts, got top_k={top_k}, num_experts={num_experts}")
        if lookahead < 0:
            raise ValueError(f"lookahead must be >= 0, got {lookahead}")
        if width is not None and not top_k <= width <= num_experts:
            raise ValueError(f"width must be in [top_k, num_experts] = [{top_k}, {num_experts}], got {width}")
        self.moe_layers = layers
        self.num_experts = int(num_experts)
        self.top_k = int(top_k)
        self.lookahead = int(lookahead)
        self.width = int(width) if width is not None else int(top_k)
        self._targets = {layer: self._next_layers(layer) for layer in layers}

    @property
    def entry(self) -> bool:
        """Asked at the layer's entry (lookahead 0), not at its MoE input."""
        return self.lookahead == 0

    def _next_layers(self, layer: int) -> list[int]:
        if self.lookahead == 0:
            return [layer] if layer in self.moe_layers else []
        i = bisect.bisect_right(self.moe_layers, layer)
        return self.moe_layers[i: i + self.lookahead]

    def targets(self, layer: int) -> list[int]:
        """The next `lookahead` MoE layers after `layer` (fewer near the end of the model); `layer` itself
        with lookahead 0."""
        t = self._targets.get(layer)
        return list(t) if t is not None else self._next_layers(layer)

    def observe(self, layer: int, experts: Tensor) -> None:
        pass

    def reset(self) -> None:
        pass

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(moe_layers={len(self.moe_layers)}, num_experts={self.num_experts}, "
                f"top_k={self.top_k}, lookahead={self.lookahead}, width={self.width})")


class NullPredictor(BasePredictor):
    """Predicts nothing: the no-prefetch baseline."""

    name = "none"

    def predict(self, layer: int, hidden: Tensor) -> dict[int, list[int]]:
        return {}
