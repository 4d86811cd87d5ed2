"""Eviction policies. A policy only decides who leaves (cachetools' lesson); the cache owns the slots.

Every policy sees the same four events from `ExpertCache`:
  on_insert(key, weight, demand)  key became resident (demand=True: after a miss, which is also a use)
  on_access(key, weight)          a resident key was used (a hit)
  on_remove(key)                  key left the cache
  victim(incoming, pinned)        pick a resident key, not in `pinned`, to make room for `incoming`
`weight` is the routing weight of the use (0.0 when unknown); score-based policies read it.
`victim` must not change what the policy believes (the cache may ask twice before evicting once).

Clocks: `lfru` and `score` decay with time measured in tokens; they only see uses, so they advance
their clock by 1/`uses_per_token` per use (`cache.simulate.replay` fills that in from the trace).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence, Set
from typing import Protocol

from cache.belady import Belady  # these import from this module only lazily (no import cycle)
from cache.quota import LayerQuota
from cache.ranked import Ranked

Key = tuple[int, int]  # (layer, expert)


class CachePolicy(Protocol):
    def on_insert(self, key: Key, weight: float = 0.0, demand: bool = True) -> None: ...
    def on_access(self, key: Key, weight: float = 0.0) -> None: ...
    def on_remove(self, key: Key) -> None: ...
    def victim(self, incoming: Key, pinned: Set[Key]) -> Key | None: ...


class LRU:
    """Least recently used: recency is the best single signal on real MoE traces."""

    def __init__(self) -> None:
        self._order: OrderedDict[Key, None] = OrderedDict()

    def on_insert(self, key: Key, weight: float = 0.0, demand: bool = True) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def on_access(self, key: Key, weight: float = 0.0) -> None:
        self._order.move_to_end(key)

    def on_remove(self, key: Key) -> None:
        del self._order[key]

    def victim(self, incoming: Key, pinned: Set[Key]) -> Key | None:
        return next((k for k in self._order if k not in pinned), None)


class LFU(Ranked):
    """Least frequently used, ties to the least recent.

    Counts are global: they survive eviction, so an expert that was hot, got evicted and comes back
    is still known to be hot (the usual choice for MoE traces, where a key's popularity is a property
    of the expert, not of its stay in the cache). A prefetch insert is not a use and counts nothing.
    """

    def __init__(self) -> None:
        super().__init__()
        self._count: dict[Key, int] = {}

    def on_insert(self, key: Key, weight: float = 0.0, demand: bool = True) -> None:
        if demand:
            self._count[key] = self._count.get(key, 0) + 1
        self._set(key, self._count.get(key, 0))

    def on_access(self, key: Key, weight: float = 0.0) -> None:
        self._count[key] = self._count.get(key, 0) + 1
        self._set(key, self._count[key])


def _logaddexp2(a: float, b: float) -> float:
    if a < b:
        a, b = b, a
    return a if b == -math.inf else a + math.log2(1.0 + 2.0 ** (b - a))


class LFRU(Ranked):
    """Frequency x recency: evict the lowest decayed use count, CRF = sum over past uses of 2^(-age/half_life).

    LRFU (Lee et al., IEEE Trans. Computers 2001): half_life -> infinity is LFU, a tiny half_life is
    LRU; in between, a key used often long ago loses to one used a little recently. Age is in tokens.
    Because every key decays by the same factor, the order is kept exactly by storing
    log2(CRF) + now/half_life, which only changes when the key is used. History survives eviction.
    """

    def __init__(self, half_life: float = 8.0, uses_per_token: float = 1.0) -> None:
        super().__init__()
        if half_life <= 0 or uses_per_token <= 0:
            raise ValueError(f"lfru needs half_life > 0 and uses_per_token > 0, got {half_life}, {uses_per_token}")
        self.half_life = half_life
        self._step = 1.0 / uses_per_token
        self._now = 0.0  # tokens
        self._crf: dict[Key, float] = {}  # key -> log2(CRF) + now / half_life, for every key ever used

    def _use(self, key: Key) -> None:
        self._now += self._step
        self._crf[key] = _logaddexp2(self._crf.get(key, -math.inf), self._now / self.half_life)
        self._set(key, self._crf[key])

    def on_insert(self, key: Key, weight: float = 0.0, demand: bool = True) -> None:
        if demand:
            self._use(key)
        else:
            self._set(key, self._crf.get(key, -math.inf))

    def on_access(self, key: Key, weight: float = 0.0) -> None:
        self._use(key)


class RoutingScore(Ranked):
    """HybriMoE's score-aware caching (arXiv 2504.05897): evict the lowest EMA of routing weights.

    Per key, once per token, S <- alpha * s + (1 - alpha) * S, where s is the routing weight the key
    received (0 when not selected). Unselected keys thus decay, so a key that stopped being routed to
    loses its place. Done lazily: S is stored scaled by (1 - alpha)^-now (log domain), which keeps the
    order exact without touching every key each token. Keys never scored (prefetched with weight 0)
    rank lowest, then least recent first. Scores survive eviction.
    """

    def __init__(self, alpha: float = 0.3, uses_per_token: float = 1.0) -> None:
        super().__init__()
        if not 0.0 < alpha < 1.0 or uses_per_token <= 0:
            raise ValueError(f"score needs 0 < alpha < 1 and uses_per_token > 0, got {alpha}, {uses_per_token}")
        self.alpha = alpha
        self._step = 1.0 / uses_per_token
        self._now = 0.0  # tokens
        self._decay = -math.log(1.0 - alpha)  # per token, > 0
        self._score: dict[Key, float] = {}  # key -> log(S) + now * decay

    def _use(self, key: Key, weight: float) -> None:
        self._now += self._step
        old = self._score.get(key, -math.inf)
        if weight > 0:
            new = math.log(self.alpha * weight) + self._now * self._decay
            hi, lo = max(old, new), min(old, new)
            old = hi if lo == -math.inf else hi + math.log1p(math.exp(lo - hi))
            self._score[key] = old
        self._set(key, old)

    def on_insert(self, key: Key, weight: float = 0.0, demand: bool = True) -> None:
        if demand:
            self._use(key, weight)
        else:
            self._set(key, self._score.get(key, -math.inf))

    def on_access(self, key: Key, weight: float = 0.0) -> None:
        self._use(key, weight)


POLICIES: dict[str, Callable[..., CachePolicy]] = {
    "lru": LRU,
    "lfu": LFU,
    "lfru": LFRU,
    "score": RoutingScore,
    "layer_quota": LayerQuota,
    "belady": Belady,
}


def make_policy(name: str, **kwargs) -> CachePolicy:
    """Build a policy by name from the plain `POLICIES` dict."""
    if name not in POLICIES:
        raise ValueError(f"unknown cache policy {name!r}; choose one of: {', '.join(sorted(POLICIES))}")
    return POLICIES[name](**kwargs)


def policy_for(name: str, capacity: int, layers: Sequence[int], top_k: int, future: list[Key] | None = None,
               **overrides) -> CachePolicy:
    """The policy of a cache of `capacity` slots serving MoE `layers` with top-k routing. The engine and the
    simulator both build theirs here, so a replay measures the engine's own policy. `future` is the access order
    Belady's MIN needs (a recorded trace); explicit `overrides` win over the derived arguments."""
    derived: dict = {}
    if name == "belady":
        if future is None:
            raise ValueError("the belady policy needs the future routing, so it only runs on recorded traces "
                             "(offload-bench policies)")
        derived = {"future": future, "strict": True}
    elif name == "layer_quota":
        derived = {"capacity": capacity, "layers": list(layers)}
    elif name in ("lfru", "score"):  # they age per token: one token = top_k uses in every MoE layer
        derived = {"uses_per_token": float(top_k * len(layers))}
    return make_policy(name, **{**derived, **overrides})
