"""Replay a routing trace through `ExpertCache` to measure policies without a model or a GPU.

Replay order matches the engine's decode loop: token by token, layer by layer; before a step, the
step's predicted experts are prefetched; then the step's keys are pinned (they must all be resident
while the layer computes), used once each, and unpinned.

With batched_prefill=True the replay follows `offload.engine.Engine` exactly: one step per forward
call (a prefill of T tokens is ONE step per layer: each distinct expert is fetched once, its first use
a miss, its other uses hits), experts in ascending id order with summed routing weights, all pinned
only when they fit (else each is accessed unpinned, as the engine falls back to). Replaying a trace
recorded by the engine (trace=True, which saves the step of each token) with the same online policy
and capacity then reproduces the engine's hits and misses exactly (demand loading, no predictor).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from numbers import Integral, Real

import numpy as np

from cache.expert_cache import ExpertCache
from cache.policies import CachePolicy, Key, policy_for
from cache.trace import Trace

Prefetch = Callable[[int, int], Iterable[int]]  # (token, layer column) -> expert ids to prefetch


@dataclass
class SimResult:
    policy: str
    capacity: int | list[int]  # slots: one global cache, or one cache per layer
    tokens: int
    hits: int
    misses: int
    evictions: int
    prefetches: int = 0  # prefetch inserts (a key already resident is not prefetched)
    useful_prefetches: int = 0  # prefetched keys used before being evicted
    expert_bytes: int | None = None

    @property
    def hit_rate(self) -> float:
        uses = self.hits + self.misses
        return self.hits / uses if uses else 0.0

    @property
    def misses_per_token(self) -> float:
        return self.misses / self.tokens if self.tokens else 0.0

    @property
    def bytes_per_token(self) -> float | None:
        """Bytes loaded per token: demand misses plus prefetches (wasted ones cost bandwidth too)."""
        if self.expert_bytes is None or not self.tokens:
            return None
        return (self.misses + self.prefetches) * self.expert_bytes / self.tokens

    @property
    def prefetch_accuracy(self) -> float:
        return self.useful_prefetches / self.prefetches if self.prefetches else 0.0

    def as_dict(self) -> dict:
        return {
            **asdict(self),
            "hit_rate": self.hit_rate,
            "misses_per_token": self.misses_per_token,
            "bytes_per_token": self.bytes_per_token,
            "prefetch_accuracy": self.prefetch_accuracy,
        }


def build_policy(name: str, trace: Trace, capacity: int, layers: Sequence[int] | None = None,
                 batched: bool = False, **kwargs) -> CachePolicy:
    """`policy_for` with what only the trace knows filled in: its top-k and, for Belady, its future.

    batched: the replay groups tokens into engine steps (`Trace.steps(batched=True)`); Belady's
    future must follow that access order."""
    layers = list(trace.moe_layers if layers is None else layers)
    keep = set(layers)
    future = [k for k in trace.keys(batched) if k[0] in keep] if name == "belady" else None
    return policy_for(name, capacity, layers, trace.top_k, future=future, **kwargs)


def slots_for(capacity: int | float, pool: int) -> int:
    """A capacity as a slot count: a float is a fraction of `pool` experts (at least one slot), an int is
    already a count."""
    if isinstance(capacity, Real) and not isinstance(capacity, Integral):
        return max(1, round(capacity * pool))
    return int(capacity)


def check_capacity(capacity: int, need: int, where: str = "the cache") -> None:
    if capacity < need:
        raise ValueError(
            f"capacity {capacity} for {where} is below {need}, the most distinct experts one step needs "
            f"resident at once; use a capacity of at least {need}"
        )


def _prefetch_source(prefetch: Prefetch | np.ndarray | None, trace: Trace) -> Prefetch | None:
    if prefetch is None or callable(prefetch):
        return prefetch
    ids = np.asarray(prefetch)
    if ids.ndim == 2:  # [T, L]: one prediction per step
        ids = ids[..., None]
    assert ids.shape[:2] == trace.experts.shape[:2], (
        f"prefetch array {ids.shape} does not match trace {trace.experts.shape}"
    )
    rows = ids.tolist()  # [T, L, P]
    return lambda t, li: rows[t][li]


def replay(
    trace: Trace,
    policy: str | CachePolicy,
    capacity: int | Sequence[int],
    per_layer: bool = False,
    prefetch: Prefetch | np.ndarray | None = None,
    batched_prefill: bool = False,
    **policy_kwargs,
) -> SimResult:
    """Replay `trace` through one global cache of `capacity` slots, or (per_layer=True) one cache per
    layer with `capacity` slots each (an int, or one int per layer).

    prefetch: per (token, layer column) predicted expert ids, as a callable (token, layer column) ->
    ids, or a [T, L, P] int array (negative = none). They are inserted with `insert_prefetch` before
    the step; a prefetched key that is used before it is evicted counts as useful.

    batched_prefill: replay one step per forward call, in the engine's order (see the module doc);
    the prefetch source is then asked once per step, with the step's first token.
    """
    need = [int(n) for n in trace.step_need()]
    if batched_prefill:  # the engine computes steps that do not fit unpinned, so any capacity works
        need = [1] * len(need)
    layers = trace.moe_layers
    if per_layer:
        if not isinstance(policy, str):
            raise ValueError("per_layer=True builds one policy per layer: pass the policy by name")
        caps = [int(capacity)] * len(layers) if isinstance(capacity, Integral) else [int(c) for c in capacity]
        if len(caps) != len(layers):
            raise ValueError(f"per_layer capacity has {len(caps)} entries for {len(layers)} MoE layers")
        for layer, cap, n in zip(layers, caps, need):
            check_capacity(cap, n, f"layer {layer}")
        caches = [
            ExpertCache(c, build_policy(policy, trace, c, [layer], batched_prefill, **policy_kwargs))
            for layer, c in zip(layers, caps)
        ]
    else:
        if not isinstance(capacity, Integral):
            raise ValueError("a global cache takes one int capacity; per-layer capacities need per_layer=True")
        capacity = int(capacity)
        check_capacity(capacity, max(need, default=0))
        pol = (build_policy(policy, trace, capacity, batched=batched_prefill, **policy_kwargs)
               if isinstance(policy, str) else policy)
        caches = [ExpertCache(capacity, pol)] * len(layers)
    predict = _prefetch_source(prefetch, trace)

    pending: set[Key] = set()  # prefetched, not yet used (may have been evicted since)
    useful = 0
    for t, li, step in trace.steps(batched_prefill):
        cache, layer = caches[li], layers[li]
        if predict is not None:
            for e in predict(t, li):
                if 0 <= e < trace.num_experts and cache.insert_prefetch((layer, e)) is not None:
                    pending.add((layer, e))
        pin = not batched_prefill or len(step) <= cache.capacity  # Engine._each_expert's pin_all
        if pin:
            for key, _, _ in step:
                cache.pin(key)
        for key, uses, weight in step:
            _, hit = cache.access(key, uses, weight)
            if key in pending:
                pending.discard(key)
                useful += hit  # a miss means it was evicted before this use
        if pin:
            for key, _, _ in step:
                cache.unpin(key)

    distinct = list({id(c): c for c in caches}.values())
    return SimResult(
        policy=policy if isinstance(policy, str) else type(policy).__name__,
        capacity=caps if per_layer else capacity,
        tokens=trace.tokens,
        hits=sum(c.stats.hits for c in distinct),
        misses=sum(c.stats.misses for c in distinct),
        evictions=sum(c.stats.evictions for c in distinct),
        prefetches=sum(c.stats.prefetch_inserts for c in distinct),
        useful_prefetches=useful,
        expert_bytes=trace.expert_bytes,
    )


def hit_rate_curve(
    trace: Trace,
    policies: Iterable[str],
    capacities: Iterable[int | float],
    per_layer: bool = False,
    prefetch: Prefetch | np.ndarray | None = None,
    batched_prefill: bool = False,
) -> list[dict]:
    """One row per (policy, capacity): `SimResult.as_dict()` plus `capacity_fraction`.

    A float capacity is a fraction (<= 1.0) of all experts (of one layer's experts when per_layer);
    an int is a slot count. Every capacity is checked before any replay runs.
    """
    pool = trace.num_experts * (1 if per_layer else len(trace.moe_layers))
    need = int(trace.step_need().max(initial=0))
    slots: list[int] = []
    for c in capacities:
        if isinstance(c, Real) and not isinstance(c, Integral):  # a fraction
            if not 0.0 < c <= 1.0:
                raise ValueError(f"capacity fraction {c} must be in (0, 1]; pass an int for a slot count")
            n = slots_for(c, pool)
            if n < need:
                raise ValueError(
                    f"capacity {c} of {pool} experts is {n} slots, below {need}, the most distinct experts one "
                    f"step needs; use a fraction of at least {need / pool:.4g} (or {need} slots)"
                )
        else:
            n = int(c)
            check_capacity(n, need)
        slots.append(n)
    rows = []
    for name in policies:
        for n in slots:
            result = replay(trace, name, n, per_layer=per_layer, prefetch=prefetch, batched_prefill=batched_prefill)
            rows.append({**result.as_dict(), "capacity_fraction": n / pool if pool else 0.0})
    return rows
