"""Eviction policies: known answers on tiny traces, one contract suite for all, Belady as the bound."""
from __future__ import annotations

import random

import numpy as np
import pytest

from cache import POLICIES, ExpertCache, Trace, make_policy, replay
from cache.belady import Belady
from cache.quota import LayerQuota, shallow_quotas

# Arguments a policy cannot do without, given the demand sequence, capacity and layer count of a test.
NEEDS = {
    "belady": lambda future, capacity, layers: {"future": future, "strict": True},
    "layer_quota": lambda future, capacity, layers: {"num_layers": layers, "capacity": capacity},
}


def build(name: str, future: list, capacity: int, layers: int):
    return make_policy(name, **NEEDS.get(name, lambda *a: {})(future, capacity, layers))


def random_trace(seed: int, tokens: int = 40, layers: int = 3, experts: int = 6, k: int = 2) -> Trace:
    """Skewed per-layer popularity plus token-to-token repeats: the two things real routing shows."""
    rng = np.random.default_rng(seed)
    popularity = rng.dirichlet(np.full(experts, 0.5), size=layers)  # [L, E]
    ids = np.empty((tokens, layers, k), np.int64)
    for t in range(tokens):
        for layer in range(layers):
            if t and rng.random() < 0.4:
                ids[t, layer] = ids[t - 1, layer]
            else:
                ids[t, layer] = rng.choice(experts, size=k, replace=False, p=popularity[layer])
    return Trace(ids, rng.random(ids.shape, dtype=np.float32), num_experts=experts)


class Spy:
    """Wraps a policy and checks every event against the resident set it tracks itself."""

    def __init__(self, inner) -> None:
        self.inner, self.resident, self.evicted = inner, set(), []

    def on_insert(self, key, weight=0.0, demand=True):
        assert key not in self.resident, f"insert of resident {key}"
        self.resident.add(key)
        self.inner.on_insert(key, weight, demand)

    def on_access(self, key, weight=0.0):
        assert key in self.resident, f"access of non-resident {key}"
        self.inner.on_access(key, weight)

    def on_remove(self, key):
        self.resident.remove(key)
        self.evicted.append(key)
        self.inner.on_remove(key)

    def victim(self, incoming, pinned):
        key = self.inner.victim(incoming, pinned)
        if key is None:
            assert self.resident <= set(pinned), "gave up while an unpinned key was resident"
        else:
            assert key in self.resident and key not in pinned, f"victim {key} not resident or pinned"
        assert self.inner.victim(incoming, pinned) == key, "victim() must not change the policy's mind"
        return key


def run(policy, sequence: list[int], capacity: int) -> tuple[int, int, list[int]]:
    """Single-layer keys, one use per step, no pins: (hits, misses, evicted experts in order)."""
    spy = Spy(policy)
    cache = ExpertCache(capacity, spy)
    for e in sequence:
        cache.access((0, e))
    return cache.stats.hits, cache.stats.misses, [e for _, e in spy.evicted]


# --- known answers ------------------------------------------------------------------------------
TEXTBOOK = [1, 2, 3, 4, 1, 2, 5, 1, 2, 3, 4, 5]  # capacity 3: LRU 10 misses, OPT 7 (Belady's example)


def test_lru_known_answer():
    # resident (least recent first) after each use:
    # 1 m [1] | 2 m [1 2] | 3 m [1 2 3] | 4 m -1 [2 3 4] | 1 m -2 [3 4 1] | 2 m -3 [4 1 2]
    # 5 m -4 [1 2 5] | 1 h [2 5 1] | 2 h [5 1 2] | 3 m -5 [1 2 3] | 4 m -1 [2 3 4] | 5 m -2 [3 4 5]
    assert run(make_policy("lru"), TEXTBOOK, 3) == (2, 10, [1, 2, 3, 4, 5, 1, 2])


def test_lfu_known_answer():
    # counts are global; ties go to the least recent. c(x) = count after the use.
    # 1 2 3 m (all c=1) | 4 m: all c=1, LRU -1 | 1 m (c1=2): 2,3,4 at c=1, LRU -2 | 2 m (c2=2): -3
    # 5 m: 4 is the only c=1 -> -4 | 1 h (c1=3) | 2 h (c2=3) | 3 m (c3=2): 5 has c=1 -> -5
    # 4 m (c4=2): 1:3 2:3 3:2 -> -3 | 5 m (c5=2): 1:3 2:3 4:2 -> -4
    assert run(make_policy("lfu"), TEXTBOOK, 3) == (2, 10, [1, 2, 3, 4, 5, 3, 4])
    # frequency beats recency: 1 is used 3 times, so 2 and 3 leave instead (LRU would evict 1)
    # 1 m 1 h 1 h | 2 m [1 2] | 3 m: c2=1 < c1=3 -> -2 | 4 m: -3 | 1 h
    assert run(make_policy("lfu"), [1, 1, 1, 2, 3, 4, 1], 2) == (3, 4, [2, 3])
    assert run(make_policy("lru"), [1, 1, 1, 2, 3, 4, 1], 2) == (2, 5, [1, 2, 3])


def test_lfu_counts_survive_eviction():
    # 1 1 (c1=2) 2 2 2 (c2=3) | 3 m: c1=2 < c2=3 -> -1 | 1 m: global c1 becomes 3; c3=1 -> -3
    # 3 m: c2=3 (last used 5th) and c1=3 (7th) tie -> least recent -2.
    # (Counts reset on eviction would give c1=1 here and evict 1 instead.)
    assert run(make_policy("lfu"), [1, 1, 2, 2, 2, 3, 1, 3], 2) == (3, 5, [1, 3, 2])


def test_belady_known_answer():
    # next use (0-based position) decides; never used again = infinity, ties to the least recent.
    # 1 2 3 m | 4 m: next 1@4 2@5 3@9 -> -3 | 1 h | 2 h | 5 m: next 1@7 2@8 4@10 -> -4
    # 1 h | 2 h | 3 m: 1, 2 never again, 5@11; least recent of 1, 2 is 1 -> -1
    # 4 m: 2 never, 3 never, 5@11; least recent of 2, 3 is 2 -> -2 | 5 h
    assert run(Belady((0, e) for e in TEXTBOOK), TEXTBOOK, 3) == (5, 7, [3, 4, 1, 2])


def test_belady_position_counts_demand_events_only():
    a, b, c = (0, 1), (0, 2), (0, 3)
    policy = Belady([a, b, a], strict=True)
    policy.on_insert(c, demand=False)  # a prefetch: no position consumed
    assert policy.position == 0
    policy.on_insert(a)
    policy.on_insert(b)
    assert policy.position == 2 and policy.next_use(a) == 2 and policy.next_use(b) == float("inf")
    assert policy.victim(c, pinned=set()) == c  # c and b are never used again; c is the least recent
    with pytest.raises(ValueError, match="Trace.keys"):
        policy.on_access(b)  # position 2 is a, not b


def test_belady_follows_a_stray_order_when_not_strict():
    a, b, c = (0, 1), (0, 2), (0, 3)
    policy = Belady([a, b, a, c])
    policy.on_insert(b)  # position 0 said a: strays; b still has its use at position 1
    policy.on_insert(a)  # position 1 said b: a's use at 0 is passed, its next is at 2
    assert policy.position == 2 and policy.next_use(b) == float("inf") and policy.next_use(a) == 2
    assert policy.victim(c, pinned=set()) == b and policy.victim(c, pinned={b}) == a


def test_score_evicts_lowest_routing_ema():
    # alpha 0.5, one use per token. After a(0.9)@1 b(0.1)@2 c(0.5)@3 the EMAs at token 3 are
    # a 0.45*0.25=0.1125, b 0.05*0.5=0.025 -> b leaves (LRU would evict a). At token 4, d(0.2):
    # a 0.45*0.125=0.056, c 0.25*0.5=0.125 -> a leaves.
    spy = Spy(make_policy("score", alpha=0.5))
    cache = ExpertCache(2, spy)
    for e, w in [(1, 0.9), (2, 0.1), (3, 0.5), (4, 0.2)]:
        cache.access((0, e), weight=w)
    assert spy.evicted == [(0, 2), (0, 1)]


def test_lfru_with_tiny_half_life_is_lru():
    trace = random_trace(7)
    assert replay(trace, "lfru", 6, half_life=1e-3).as_dict()["misses"] == replay(trace, "lru", 6).misses


def test_layer_quota_known_answer():
    policy = LayerQuota(num_layers=2, capacity=6)
    assert policy.quotas == [4, 2]  # weights 2:1 share the 4 slots left after one each: 1+3, 1+1
    spy = Spy(policy)
    cache = ExpertCache(6, spy)
    for e in range(6):
        cache.access((1, e))  # free slots: layer 1 may hold all 6 while nobody else needs them
    for e in range(4):
        cache.access((0, e))  # layer 0 under quota: layer 1 (most over) gives up its LRU keys
    assert spy.evicted == [(1, 0), (1, 1), (1, 2), (1, 3)] and policy.counts == [4, 2]
    cache.access((0, 4))  # layer 0 at quota: evicts its own LRU key
    cache.access((1, 9))  # layer 1 at quota: likewise
    assert spy.evicted[4:] == [(0, 0), (1, 4)] and policy.counts == [4, 2]


@pytest.mark.parametrize("layers, capacity", [(1, 5), (4, 10), (8, 8), (30, 200), (7, 3)])
def test_shallow_quotas_sum_and_favor_shallow(layers, capacity):
    quotas = shallow_quotas(layers, capacity)
    assert sum(quotas) == capacity and len(quotas) == layers
    assert all(a >= b for a, b in zip(quotas, quotas[1:])), quotas
    if capacity >= layers:
        assert min(quotas) >= 1
    if capacity >= 3 * layers > 3:
        assert quotas[0] > quotas[-1]
    assert shallow_quotas(layers, capacity, skew=0.0)[0] - shallow_quotas(layers, capacity, skew=0.0)[-1] <= 1


# --- contract suite: every policy ---------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(POLICIES))
@pytest.mark.parametrize("seed", range(3))
def test_policy_contract(name, seed):
    """Random accesses, prefetches, removals and pins: pinned keys stay, capacity holds, uses add up."""
    rng = random.Random(seed)
    capacity, layers = 4, 3
    keys = [(layer, e) for layer in range(layers) for e in range(5)]
    ops = []
    for _ in range(400):
        r = rng.random()
        ops.append(("access" if r < 0.75 else "prefetch" if r < 0.9 else "remove", rng.choice(keys), rng.randint(1, 2)))
    future = [key for op, key, _ in ops if op == "access"]
    spy = Spy(build(name, future, capacity, layers))
    cache = ExpertCache(capacity, spy)
    uses = 0
    for op, key, n in ops:
        pinned = rng.sample(cache.keys(), min(len(cache), rng.randint(0, capacity - 1)))
        for p in pinned:
            cache.pin(p)
        if op == "access":
            cache.access(key, uses=n, weight=rng.random())
            uses += n
            assert key in cache
        elif op == "prefetch":
            cache.insert_prefetch(key, weight=0.0)
        else:
            free = [k for k in cache.keys() if k not in pinned]
            if free:
                cache.remove(rng.choice(free))
        assert all(p in cache for p in pinned), "a pinned key was evicted"
        assert len(cache) <= capacity and set(cache.keys()) == spy.resident
        for p in pinned:
            cache.unpin(p)
    assert cache.stats.hits + cache.stats.misses == uses


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_policy_replay_accounting(name):
    for seed in range(3):
        trace = random_trace(seed)
        for capacity in (2, 7):
            result = replay(trace, name, capacity)
            assert result.hits + result.misses == int(trace.valid.sum())
            assert result.misses >= len(set(trace.keys()))  # every distinct key misses once at least


# --- Belady is the bound ------------------------------------------------------------------------
def test_belady_never_beaten():
    others = sorted(set(POLICIES) - {"belady"})
    for seed in range(32):
        trace = random_trace(100 + seed, tokens=30)
        for capacity in (2, 4, 8):
            best = replay(trace, "belady", capacity).misses
            for name in others:
                assert best <= replay(trace, name, capacity).misses, (seed, capacity, name)
        best = replay(trace, "belady", 3, per_layer=True).misses
        for name in ("lru", "lfu", "score"):
            assert best <= replay(trace, name, 3, per_layer=True).misses, (seed, "per_layer", name)


@pytest.mark.parametrize("name", ["lru", "lfu", "lfru", "score"])
def test_prefetch_never_evicts_protected_keys(name):
    """A prefetch takes its slot only from keys `protect` rejects, or is dropped; demand loads ignore it."""
    cache = ExpertCache(2, make_policy(name))
    cache.access((1, 0))
    cache.access((0, 0))  # LRU order: (1, 0) is the oldest
    cache.access((0, 0))
    assert cache.insert_prefetch((1, 1), protect=lambda k: k[0] == 1) is not None
    assert (1, 0) in cache and (0, 0) not in cache
    assert cache.insert_prefetch((2, 0), protect=lambda k: k[0] == 1) is None  # only protected keys are left
    assert set(cache.keys()) == {(1, 0), (1, 1)}
    assert cache.insert_prefetch((2, 0)) is not None  # unprotected: the policy's own victim
    assert len(cache) == 2 and (2, 0) in cache
    cache.access((3, 0))  # a demand miss evicts whatever the policy says
    assert (3, 0) in cache
