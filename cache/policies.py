"""Eviction policies. A policy only decides who leaves (cachetools' lesson); the cache owns the slots.

Every policy sees the same four events from `ExpertCache`:
  on_insert(key, weight, demand)  key became resident (demand=True: after a miss, which is also a use)
  on_access(key, weight)          a resident key was used (a hit)
  on_remove(key)                  key left the cache
  victim(incoming, pinned)        pick a resident key, not in `pinned`, to make room for `incoming`
`weight` is the routing weight of the use (0.0 when unknown); score-based policies read it.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Set
from typing import Protocol

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


POLICIES: dict[str, Callable[..., CachePolicy]] = {"lru": LRU}


def make_policy(name: str, **kwargs) -> CachePolicy:
    """Build a policy by name from the plain `POLICIES` dict."""
    if name not in POLICIES:
        raise ValueError(f"unknown cache policy {name!r}; choose one of: {', '.join(sorted(POLICIES))}")
    return POLICIES[name](**kwargs)
