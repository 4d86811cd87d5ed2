"""Belady's MIN (Belady 1966): the offline optimum every real policy is measured against.

On a miss with a full cache, evict the resident key whose next use lies farthest in the future (never
used again = infinitely far). For demand paging (every missing key must be loaded) this minimizes
misses; it needs the whole future, so it exists only for trace replay, as the upper bound on hit rate.
"""
from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Set
from typing import TYPE_CHECKING

from cache.ranked import Ranked

if TYPE_CHECKING:
    from cache.policies import Key


class Belady(Ranked):
    """MIN over a known demand sequence `future` (`Trace.keys()`: token-major, then layer, then k).

    Position tracking: `position` is the index into `future` of the next demand. Each `on_access`
    and each demand `on_insert` (demand=True) consumes one position; prefetch inserts (demand=False),
    removals and `victim` calls do not. So the cache must see exactly one use event per entry of
    `future`, in order (`ExpertCache.access(key, uses=n)` is one event, whatever n). With strict=True
    an event whose key is not `future[position]` raises; otherwise the policy follows as best it can.

    Each key keeps a deque of its future positions, so an event is O(1). While events follow
    `future`, a resident key's next use changes only at its own events, so ranks (-next use, ties
    to the least recent) sit in the `Ranked` heap; once an event strays, `victim` scans instead.
    """

    def __init__(self, future: Iterable[Key], strict: bool = False) -> None:
        super().__init__()
        self.strict = strict
        self.position = 0
        self._next: dict[Key, deque[int]] = {}
        for i, key in enumerate(future):
            self._next.setdefault(key, deque()).append(i)
        self._strayed = False  # an event did not match `future`: heap ranks may be stale

    def next_use(self, key: Key) -> float:
        """Position of `key`'s next demand at or after `position`; math.inf if none."""
        q = self._next.get(key)
        while q and q[0] < self.position:  # left behind by events that strayed from `future`
            q.popleft()
        return q[0] if q else math.inf

    def _advance(self, key: Key) -> None:
        q = self._next.get(key)
        if not (q and q[0] == self.position):
            if self.strict:
                raise ValueError(
                    f"belady: demand {self.position} is {key}, but the future sequence says otherwise; "
                    "build the policy from the same access order the cache replays (Trace.keys())"
                )
            self._strayed = True
        while q and q[0] <= self.position:
            q.popleft()
        self.position += 1

    def on_insert(self, key: Key, weight: float = 0.0, demand: bool = True) -> None:
        if demand:
            self._advance(key)
        self._set(key, -self.next_use(key))

    def on_access(self, key: Key, weight: float = 0.0) -> None:
        self._advance(key)
        self._set(key, -self.next_use(key))

    def victim(self, incoming: Key, pinned: Set[Key]) -> Key | None:
        if not self._strayed:
            return super().victim(incoming, pinned)
        candidates = [(-self.next_use(k), tick, k) for k, (_, tick) in self._rank.items() if k not in pinned]
        return min(candidates)[2] if candidates else None
