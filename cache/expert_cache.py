"""ExpertCache: (layer, expert) keys -> a fixed pool of slot indices, with exact accounting.

The cache never touches tensors: slot `i` is an index into a pool the caller owns (device buffers in
`offload`, nothing at all in the simulator). Keys that are pinned (the layer being computed, loads in
flight) are never evicted; everything else is up to the policy.
"""
from __future__ import annotations

from collections.abc import Callable, Container
from dataclasses import asdict, dataclass

from cache.policies import CachePolicy, Key


class CacheFull(RuntimeError):
    """Every resident key is pinned, so there is no room for another."""


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    prefetch_inserts: int = 0

    @property
    def hit_rate(self) -> float:
        uses = self.hits + self.misses
        return self.hits / uses if uses else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "hit_rate": self.hit_rate}


class ExpertCache:
    """A fixed number of slots; `policy` picks victims among unpinned residents."""

    def __init__(self, capacity: int, policy: CachePolicy) -> None:
        if capacity < 1:
            raise ValueError(f"cache capacity must be at least 1 slot, got {capacity}")
        self.capacity = capacity
        self.policy = policy
        self.stats = CacheStats()
        self._slot: dict[Key, int] = {}
        self._free: list[int] = list(range(capacity - 1, -1, -1))
        self._pins: dict[Key, int] = {}

    def __contains__(self, key: Key) -> bool:
        return key in self._slot

    def __len__(self) -> int:
        return len(self._slot)

    def keys(self) -> list[Key]:
        return list(self._slot)

    def slot(self, key: Key) -> int | None:
        """The slot holding `key`, or None; counts nothing."""
        return self._slot.get(key)

    def access(self, key: Key, uses: int = 1, weight: float = 0.0) -> tuple[int, bool]:
        """Use `key` `uses` times in one step. Returns (slot, hit).

        On a miss the key is inserted (evicting if needed) and the caller must fill the slot before
        reading it. The first use of a missing key is the miss; the other uses in the same step hit.
        """
        slot = self._slot.get(key)
        if slot is not None:
            self.stats.hits += uses
            self.policy.on_access(key, weight)
            return slot, True
        slot = self._insert(key, weight, demand=True)
        self.stats.misses += 1
        self.stats.hits += uses - 1
        return slot, False

    def insert_prefetch(self, key: Key, weight: float = 0.0, protect: Callable[[Key], bool] | None = None) -> int | None:
        """Make room for a prefetched key; None (prefetch dropped) when that would take a slot that a pinned,
        not yet resident key (a demand load of the layer being computed) still needs, or when every evictable
        key is one `protect` says a guess must not displace."""
        if key in self._slot:
            return None
        pinned_resident = sum(1 for k in self._pins if k in self._slot)
        room = len(self._free) + len(self._slot) - pinned_resident  # slots a demand load could still take
        if room <= len(self._pins) - pinned_resident:  # those are reserved for pinned keys not yet resident
            return None
        blocked = self._pins.keys() if protect is None else _Blocked(self._pins, protect)
        if not self._free and self.policy.victim(key, blocked) is None:
            return None
        self.stats.prefetch_inserts += 1
        return self._insert(key, weight, demand=False, blocked=blocked)

    def pin(self, key: Key) -> None:
        """Forbid evicting `key` until a matching `unpin`; pins nest."""
        self._pins[key] = self._pins.get(key, 0) + 1

    def unpin(self, key: Key) -> None:
        n = self._pins[key] - 1
        if n:
            self._pins[key] = n
        else:
            del self._pins[key]

    def pinned(self) -> set[Key]:
        return set(self._pins)

    def remove(self, key: Key) -> None:
        """Drop `key` (a failed load); its slot becomes free."""
        slot = self._slot.pop(key)
        self.policy.on_remove(key)
        self._free.append(slot)

    def _insert(self, key: Key, weight: float, demand: bool, blocked: Container[Key] | None = None) -> int:
        if not self._free:
            victim = self.policy.victim(key, self._pins.keys() if blocked is None else blocked)
            if victim is None:
                raise CacheFull(
                    f"all {self.capacity} cache slots hold pinned experts; raise cache_experts above {self.capacity}"
                )
            assert victim in self._slot and victim not in self._pins, f"policy chose invalid victim {victim}"
            self._free.append(self._slot.pop(victim))
            self.policy.on_remove(victim)
            self.stats.evictions += 1
        slot = self._free.pop()
        self._slot[key] = slot
        self.policy.on_insert(key, weight, demand)
        return slot


class _Blocked:
    """Keys a prefetch may not evict: the pinned ones and the protected ones. Policies only test membership
    (`key in pinned`), so that is all this answers."""

    __slots__ = ("_pins", "_protect")

    def __init__(self, pins: Container[Key], protect: Callable[[Key], bool]) -> None:
        self._pins, self._protect = pins, protect

    def __contains__(self, key: object) -> bool:
        return key in self._pins or self._protect(key)  # type: ignore[arg-type]
