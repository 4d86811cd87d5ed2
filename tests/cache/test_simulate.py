"""Replay: equals a straightforward LRU loop, counts prefetch usefulness, names the capacity to use."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cache import Trace, hit_rate_curve, replay


def random_trace(seed: int, tokens: int = 50, layers: int = 4, experts: int = 8, k: int = 2) -> Trace:
    """Uniform picks, half the slots copied from the previous token (repeats there become padding)."""
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.permutation(experts)[:k] for _ in range(tokens * layers)]).reshape(tokens, layers, k)
    for t in range(1, tokens):
        ids[t] = np.where(rng.random((layers, k)) < 0.5, ids[t - 1], ids[t])
    ids = np.sort(ids, axis=-1)
    ids[..., 1:][ids[..., 1:] == ids[..., :-1]] = -1
    return Trace(ids, np.ones(ids.shape, np.float32), num_experts=experts, expert_bytes=100)


def naive_lru(trace: Trace, capacity: int, per_layer: bool = False) -> tuple[int, int]:
    """The obvious loop: a list, least recent first; a step's own keys may not be evicted."""
    lists: dict = {}
    hits = misses = 0
    for t in range(trace.tokens):
        for li, layer in enumerate(trace.moe_layers):
            resident = lists.setdefault(layer if per_layer else None, [])
            step = [(layer, int(e)) for e in dict.fromkeys(trace.experts[t, li].tolist()) if 0 <= e < trace.num_experts]
            for key in step:
                if key in resident:
                    hits += 1
                    resident.remove(key)
                else:
                    misses += 1
                    if len(resident) == capacity:
                        resident.remove(next(k for k in resident if k not in step))
                resident.append(key)
    return hits, misses


@pytest.mark.parametrize("seed", range(4))
def test_replay_equals_naive_lru(seed):
    trace = random_trace(seed)
    for capacity in (2, 5, 13):
        result = replay(trace, "lru", capacity)
        assert (result.hits, result.misses) == naive_lru(trace, capacity)
        assert result.misses_per_token == result.misses / trace.tokens
        assert result.bytes_per_token == result.misses * 100 / trace.tokens
        per_layer = replay(trace, "lru", 3, per_layer=True)
        assert (per_layer.hits, per_layer.misses) == naive_lru(trace, 3, per_layer=True)
        assert per_layer.capacity == [3] * 4


def test_prefetch_usefulness_known_answer():
    # one layer, 4 experts, top-1, capacity 2, LRU (resident least recent first):
    # t0 need 0, no prefetch: 0 m [0]
    # t1 prefetch 1 -> [0 1] | need 1: hit, useful (1)
    # t2 prefetch 3: evicts 0 -> [1 3] | need 2: miss, evicts 1 -> [3 2]
    # t3 prefetch 0: evicts 3 (wasted) -> [2 0] | need 0: hit, useful (2)
    # t4 no prefetch | need 3: miss (it was evicted: not useful), evicts 2 -> [0 3]
    # t5 prefetch 0: already resident, not a prefetch | need 0: hit
    experts = np.array([0, 1, 2, 0, 3, 0]).reshape(6, 1, 1)
    predicted = np.array([-1, 1, 3, 0, -1, 0]).reshape(6, 1, 1)
    trace = Trace(experts, np.ones(experts.shape), num_experts=4, expert_bytes=10)
    expected = {"hits": 3, "misses": 3, "prefetches": 3, "useful_prefetches": 2}
    for prefetch in (predicted, lambda t, li: predicted[t, li].tolist()):
        result = replay(trace, "lru", 2, prefetch=prefetch).as_dict()
        assert {k: result[k] for k in expected} == expected
        assert result["bytes_per_token"] == (3 + 3) * 10 / 6  # wasted prefetches cost bytes too
        assert result["prefetch_accuracy"] == pytest.approx(2 / 3)


def test_capacity_below_one_step_names_the_minimum():
    trace = random_trace(0, k=3)
    need = int(trace.step_need().max())
    with pytest.raises(ValueError, match=f"at least {need}"):
        replay(trace, "lru", need - 1)
    with pytest.raises(ValueError, match=f"at least {need}"):
        hit_rate_curve(trace, ["lru"], [need - 1])
    with pytest.raises(ValueError, match="fraction of at least"):
        hit_rate_curve(trace, ["lru"], [0.01])
    with pytest.raises(ValueError, match="layer 0"):
        replay(trace, "lru", [need - 1, 8, 8, 8], per_layer=True)


def test_hit_rate_curve_rows():
    trace = random_trace(1)
    rows = hit_rate_curve(trace, ["lru", "belady"], [0.25, 1.0, 4])
    assert [(r["policy"], r["capacity"]) for r in rows] == [
        ("lru", 8), ("lru", 32), ("lru", 4), ("belady", 8), ("belady", 32), ("belady", 4)
    ]  # fmt: skip
    full = rows[1]
    assert full["capacity_fraction"] == 1.0 and full["misses"] == len(set(trace.keys()))  # only cold misses
    assert all(b["hit_rate"] >= a["hit_rate"] for a, b in zip(rows[:3], rows[3:]))


def test_import_cache_does_not_import_torch():
    modules = "cache, cache.simulate, cache.trace, cache.belady, cache.quota, cache.ranked"
    code = f"import sys, {modules}; assert 'torch' not in sys.modules, 'cache imported torch'"
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True)
