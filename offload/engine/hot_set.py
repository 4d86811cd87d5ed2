"""The static hot set: the experts a routing trace uses most, pinned in the device tier for good.

llama.cpp users pair a static placement with a dynamic VRAM cache (discussion #28248): the hot set never
moves, so its experts cost no eviction decisions and no reloads, while the remaining slots follow the
workload. Half the slots are pinned, never more than leaves one layer's top-k to the dynamic part.
"""
from __future__ import annotations

from collections import Counter

import numpy as np

from cache import Key, Trace
from offload.errors import OffloadError

HOT_SHARE = 0.5  # of the device slots


def hot_keys(path: str, moe_layers: list[int], num_experts: int, capacity: int, top_k: int) -> list[Key]:
    """The most used (layer, expert) keys of the trace at `path`, most used first, at most HOT_SHARE of
    `capacity` and never more than `capacity - top_k`."""
    try:
        trace = Trace.load(path)
    except (OSError, ValueError, KeyError) as e:
        raise OffloadError(f"cannot read routing trace {path} ({e}); record one with offload-bench trace, or drop "
                           f"hot_trace") from None
    if trace.moe_layers != moe_layers or trace.num_experts != num_experts:
        raise OffloadError(f"routing trace {path} is of MoE layers {trace.moe_layers[:4]}... x {trace.num_experts} "
                           f"experts, this model has {moe_layers[:4]}... x {num_experts}; record it on this model "
                           f"(offload-bench trace) or drop hot_trace")
    counts: Counter = Counter()
    valid = trace.valid
    for li, layer in enumerate(trace.moe_layers):
        ids, n = np.unique(trace.experts[:, li][valid[:, li]], return_counts=True)
        counts.update({(layer, int(e)): int(c) for e, c in zip(ids, n)})
    n = max(0, min(int(capacity * HOT_SHARE), capacity - top_k))
    return [key for key, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]]
