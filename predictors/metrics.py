"""Prediction quality: recall@k, precision, useful-prefetch rate, and an accumulator per target layer.

Conventions: ids are compared as sets (duplicates count once); an empty denominator gives 1.0 (nothing to
miss, nothing wasted). `PredictorScore` sums hits and totals over updates (micro average), so those vacuous
cases do not weigh on its figures.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable, Iterable


def _items(x) -> list:
    """A tensor/array (any shape) or an iterable of ids as a list, order kept."""
    if hasattr(x, "tolist") and not isinstance(x, (list, tuple)):
        x = x.tolist()
        if not isinstance(x, list):
            return [x]
        while x and isinstance(x[0], list):
            x = [v for row in x for v in row]
        return x
    return list(x)


def _dedup(xs: Iterable) -> list:
    return list(dict.fromkeys(xs))


def recall_at_k(predicted: Iterable[Hashable], actual: Iterable[Hashable], k: int | None) -> float:
    """Share of the distinct `actual` ids found in the first `k` distinct predicted ids (k=None: all)."""
    pred = set(_dedup(_items(predicted))[:k])
    act = set(_items(actual))
    return len(pred & act) / len(act) if act else 1.0


def precision(predicted: Iterable[Hashable], actual: Iterable[Hashable], k: int | None = None) -> float:
    """Share of the first `k` distinct predicted ids (k=None: all) that are in `actual`."""
    pred = set(_dedup(_items(predicted))[:k])
    return len(pred & set(_items(actual))) / len(pred) if pred else 1.0


def useful_prefetch_rate(prefetched: Iterable[Hashable], used: Iterable[Hashable]) -> float:
    """Share of the distinct prefetched keys (e.g. (layer, expert)) that were used before leaving."""
    pre = set(_items(prefetched))
    return len(pre & set(_items(used))) / len(pre) if pre else 1.0


@dataclass
class PredictorScore:
    """Accumulates (layer, predicted, actual) per target layer; micro-averaged recall and precision.

    `k`: score only the first k predicted ids (None: the whole list). `num_experts`: if set, actual ids
    outside [0, num_experts) are padding and dropped (so a raw top_k_index tensor can be fed).
    """

    k: int | None = None
    num_experts: int | None = None
    hits: dict[int, int] = field(default_factory=dict)       # |predicted[:k] & actual| summed
    actual: dict[int, int] = field(default_factory=dict)     # |actual| summed
    predicted: dict[int, int] = field(default_factory=dict)  # |predicted[:k]| summed
    updates: dict[int, int] = field(default_factory=dict)

    def update(self, layer: int, predicted: Iterable[int], actual: Iterable[int]) -> float:
        """Add one prediction for `layer`; returns its own recall."""
        pred = set(_dedup(_items(predicted))[: self.k])
        act = set(_items(actual))
        if self.num_experts is not None:
            act = {a for a in act if 0 <= a < self.num_experts}
        hit = len(pred & act)
        for d, v in ((self.hits, hit), (self.actual, len(act)), (self.predicted, len(pred)), (self.updates, 1)):
            d[layer] = d.get(layer, 0) + v
        return hit / len(act) if act else 1.0

    def update_all(self, predictions: dict[int, Iterable[int]], actual: dict[int, Iterable[int]]) -> None:
        """Score a whole predict() result against {layer: actual experts} (layers missing in `actual` skipped)."""
        for layer, pred in predictions.items():
            if layer in actual:
                self.update(layer, pred, actual[layer])

    def _sum(self, d: dict[int, int], layer: int | None) -> int:
        return sum(d.values()) if layer is None else d.get(layer, 0)

    def recall(self, layer: int | None = None) -> float:
        """Hits / actual experts, for one target layer or overall (None); 0.0 before any update."""
        a = self._sum(self.actual, layer)
        return self._sum(self.hits, layer) / a if a else 0.0

    def precision(self, layer: int | None = None) -> float:
        """Hits / predicted experts, for one target layer or overall (None); 0.0 before any update."""
        p = self._sum(self.predicted, layer)
        return self._sum(self.hits, layer) / p if p else 0.0

    def per_layer(self) -> dict[int, float]:
        """{target layer: recall}."""
        return {layer: self.recall(layer) for layer in sorted(self.actual)}

    def summary(self) -> dict:
        return {"recall": self.recall(), "precision": self.precision(), "updates": sum(self.updates.values()),
                "per_layer_recall": self.per_layer()}

    def reset(self) -> None:
        for d in (self.hits, self.actual, self.predicted, self.updates):
            d.clear()
