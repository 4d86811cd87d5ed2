"""Per-layer slot quotas favoring shallow layers (Fate, arXiv 2502.12224, "shallow-favoring caching").

Why shallow first: a cross-layer predictor guesses layer l+1's experts from layer l's input, and those
guesses are worst for the first layers (and impossible for layer 0), so deep layers can lean on
prefetch while shallow layers need the cache. Quotas also stop one busy layer from flushing the rest.
"""
from __future__ import annotations

from collections.abc import Sequence, Set
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cache.policies import CachePolicy, Key


def shallow_quotas(num_layers: int, capacity: int, skew: float = 1.0) -> list[int]:
    """Slots per layer, shallowest first, summing to `capacity`.

    Every layer gets 1 slot, and the other `capacity - num_layers` are shared in proportion to
    linearly decreasing weights w_i = 1 + skew * (L-1-i) / (L-1): with the default skew=1 the
    shallowest layer's weight is twice the deepest's; skew=0 is uniform. Shares are rounded by largest
    remainder (ties to the shallower layer). If capacity < num_layers, the `capacity` shallowest layers
    get one slot each and the rest none.
    """
    if num_layers < 1 or capacity < 0 or skew < 0:
        raise ValueError(f"need num_layers >= 1, capacity >= 0, skew >= 0; got {num_layers}, {capacity}, {skew}")
    if capacity < num_layers:
        return [1] * capacity + [0] * (num_layers - capacity)
    span = max(num_layers - 1, 1)
    weights = [1.0 + skew * (num_layers - 1 - i) / span for i in range(num_layers)]
    spare, total = capacity - num_layers, sum(weights)
    shares = [spare * w / total for w in weights]
    quotas = [1 + int(s) for s in shares]
    by_remainder = sorted(range(num_layers), key=lambda i: (-(shares[i] - int(shares[i])), i))
    for i in by_remainder[: capacity - sum(quotas)]:
        quotas[i] += 1
    return quotas


class LayerQuota:
    """One inner policy per layer plus a slot quota per layer (`shallow_quotas`).

    victim: if the incoming key's layer holds at least its quota, evict from that layer (by its inner
    policy); otherwise evict from the layer most over its quota (ties: the deeper layer). Quotas are
    soft: when the chosen layer has only pinned keys, the next most over-quota layer gives one up.
    `layers` are the model layer indices keys carry (default range(num_layers)), shallowest first.
    """

    def __init__(
        self,
        num_layers: int | None = None,
        capacity: int = 0,
        inner: str = "lru",
        layers: Sequence[int] | None = None,
        skew: float = 1.0,
        **inner_kwargs,
    ) -> None:
        from cache.policies import make_policy  # here, not at the top: policies imports this module

        if layers is None:
            if num_layers is None:
                raise ValueError("layer_quota needs num_layers (or layers, the model's MoE layer indices)")
            layers = range(num_layers)
        self.layers = list(layers)
        if num_layers is not None and num_layers != len(self.layers):
            raise ValueError(f"layer_quota: num_layers={num_layers} but {len(self.layers)} layers given")
        if capacity < 1:
            raise ValueError(f"layer_quota needs the cache capacity (slots) to split, got capacity={capacity}")
        self.quotas = shallow_quotas(len(self.layers), capacity, skew)
        self._index = {layer: i for i, layer in enumerate(self.layers)}
        self._inner: list[CachePolicy] = [make_policy(inner, **inner_kwargs) for _ in self.layers]
        self.counts = [0] * len(self.layers)  # resident keys per layer

    def _layer(self, key: Key) -> int:
        try:
            return self._index[key[0]]
        except KeyError:
            raise KeyError(f"layer_quota: key {key} has a layer outside its layers {self.layers}") from None

    def on_insert(self, key: Key, weight: float = 0.0, demand: bool = True) -> None:
        i = self._layer(key)
        self.counts[i] += 1
        self._inner[i].on_insert(key, weight, demand)

    def on_access(self, key: Key, weight: float = 0.0) -> None:
        self._inner[self._layer(key)].on_access(key, weight)

    def on_remove(self, key: Key) -> None:
        i = self._layer(key)
        self.counts[i] -= 1
        self._inner[i].on_remove(key)

    def victim(self, incoming: Key, pinned: Set[Key]) -> Key | None:
        i = self._layer(incoming)
        if self.counts[i] and self.counts[i] >= self.quotas[i]:
            key = self._inner[i].victim(incoming, pinned)
            if key is not None:
                return key
        over = sorted(range(len(self.layers)), key=lambda j: (self.counts[j] - self.quotas[j], j), reverse=True)
        for j in over:
            if self.counts[j]:
                key = self._inner[j].victim(incoming, pinned)
                if key is not None:
                    return key
        return None
