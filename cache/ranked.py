"""Ranked: the shared core of policies that evict the key with the smallest rank (LFU, LFRU, score, Belady).

Ranks live in a heap with lazy deletion (stale entries are skipped when they reach the top), so a
miss costs O(log n) instead of a scan of every resident key: this is what keeps a replay of a
thousands-of-slots cache fast.
"""
from __future__ import annotations

import heapq
from collections.abc import Set
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cache.policies import Key


class Ranked:
    """Evicts the unpinned resident key with the smallest rank.

    A rank is `(value, tick)`: subclasses compute `value` and call `_set` on every event; `tick` stamps
    the event, so equal values fall back to the least recently touched key.
    """

    def __init__(self) -> None:
        self._rank: dict[Key, tuple[float, int]] = {}  # resident key -> its current rank
        self._heap: list[tuple[tuple[float, int], Key]] = []
        self._tick = 0

    def _set(self, key: Key, value: float) -> None:
        self._tick += 1
        rank = (value, self._tick)
        self._rank[key] = rank
        heapq.heappush(self._heap, (rank, key))
        if len(self._heap) > 4 * len(self._rank) + 64:  # too many stale entries: rebuild
            self._heap = [(r, k) for k, r in self._rank.items()]
            heapq.heapify(self._heap)

    def on_remove(self, key: Key) -> None:
        del self._rank[key]

    def victim(self, incoming: Key, pinned: Set[Key]) -> Key | None:
        heap, skipped, found = self._heap, [], None
        while heap:
            rank, key = heap[0]
            if self._rank.get(key) != rank:
                heapq.heappop(heap)  # stale: key left or was re-ranked
            elif key in pinned:
                skipped.append(heapq.heappop(heap))
            else:
                found = key
                break
        for entry in skipped:
            heapq.heappush(heap, entry)
        return found
