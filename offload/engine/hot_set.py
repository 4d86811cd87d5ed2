"""The static hot set: the experts a routing trace (recorded, or a warm-up over a text) uses most, pinned in
the device tier for good.

llama.cpp users pair a static placement with a dynamic VRAM cache (discussion #28248): the hot set never
moves, so its experts cost no eviction decisions and no reloads, while the remaining slots follow the
workload. Half the slots are pinned, never more than leaves one layer's top-k to the dynamic part.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import torch

from cache import Key, Trace
from offload.errors import OffloadError

HOT_SHARE = 0.5  # of the device slots
WARMUP_TOKENS = 512  # of a warm-up text: enough for every layer's routing frequencies to settle on the demo


def is_trace(path: str) -> bool:
    return Path(path).suffix == ".npz"


def load_trace(path: str, moe_layers: list[int], num_experts: int) -> Trace:
    """A recorded routing trace, refused with the fix when unreadable or of another model."""
    try:
        trace = Trace.load(path)
    except (OSError, ValueError, KeyError) as e:
        raise OffloadError(f"cannot read routing trace {path} ({e}); record one with offload-bench trace, or drop "
                           f"hot_set") from None
    if trace.moe_layers != moe_layers or trace.num_experts != num_experts:
        raise OffloadError(f"routing trace {path} is of MoE layers {trace.moe_layers[:4]}... x {trace.num_experts} "
                           f"experts, this model has {moe_layers[:4]}... x {num_experts}; record it on this model "
                           f"(offload-bench trace) or drop hot_set")
    return trace


def warmup_ids(path: str, tokenizer, limit: int | None = None) -> torch.Tensor:
    """The first WARMUP_TOKENS tokens (at most `limit`: the context) of the text at `path`, as one prompt."""
    if tokenizer is None:
        raise OffloadError(f"a warm-up text ({path}) needs the checkpoint's tokenizer files; give a routing trace "
                           f"(.npz, offload-bench trace) as hot_set instead")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise OffloadError(f"cannot read warm-up text {path} ({e}); give a UTF-8 text file or a routing trace "
                           f"(.npz) as hot_set") from None
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :min(WARMUP_TOKENS, limit or WARMUP_TOKENS)]
    if ids.shape[1] < 2:
        raise OffloadError(f"warm-up text {path} has {ids.shape[1]} tokens; give a longer text (a few hundred "
                           f"tokens of the expected workload) as hot_set")
    return ids


def hot_keys(trace: Trace, capacity: int, top_k: int) -> list[Key]:
    """The most used (layer, expert) keys of `trace`, most used first, at most HOT_SHARE of `capacity` and
    never more than `capacity - top_k`."""
    counts: Counter = Counter()
    valid = trace.valid
    for li, layer in enumerate(trace.moe_layers):
        ids, n = np.unique(trace.experts[:, li][valid[:, li]], return_counts=True)
        counts.update({(layer, int(e)): int(c) for e, c in zip(ids, n)})
    n = max(0, min(int(capacity * HOT_SHARE), capacity - top_k))
    return [key for key, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]]
