"""RamTier: expert records held in host memory, between the disk store and the device slots.

A pool of host records with its own cache, policy and prefetcher reading the disk store, so the predictor's
prefetches hide the disk -> RAM link. Records are kept in the host's form: on a CPU engine the CPU compute
form (experts compute from them in place), next to a GPU the stored form in pinned memory (one copy per device
load, no disk read). `PoolStore` puts the pool behind the store interface, so the device tier's prefetcher
copies from RAM exactly as it reads a store.
"""
from __future__ import annotations

import torch

from cache import ExpertCache, Key
from offload.engine.prefetch import Prefetcher
from offload.engine.slots import SlotPool
from offload.engine.stats import EngineStats
from offload.store.disk import round_up


class RamTier:
    def __init__(self, store, cache: ExpertCache, host_bytes: int, transform=None, worker: str = "thread",
                 pinned: bool = False) -> None:
        """`host_bytes`: one record in host form; `transform(key, record, slot)` turns a stored record into it
        (None: records are kept as stored)."""
        self.store, self.cache = store, cache
        self.slots = SlotPool(cache.capacity, host_bytes, torch.device("cpu"), shared=worker == "process",
                              pinned=pinned)
        self.stats = EngineStats()  # the disk -> RAM link: bytes, loads, stall, prefetches
        self.prefetcher = Prefetcher(store, cache, self.slots, self.stats, transform=transform, worker=worker)

    @property
    def capacity(self) -> int:
        return self.cache.capacity

    def close(self) -> None:
        self.prefetcher.close()


class PoolStore:
    """The store interface over a RamTier: reading a record copies it out of RAM. The engine has fetched (and
    pinned) the key in the RAM tier before the device tier reads it, so a read never touches the disk."""

    tier = "ram"
    direct = False

    def __init__(self, ram: RamTier) -> None:
        self.ram, self.disk = ram, ram.store
        self.record_bytes = ram.slots.record_bytes
        self.buffer_bytes = round_up(self.record_bytes)

    def keys(self) -> list[Key]:
        return self.disk.keys()

    def format_of(self, key: Key) -> str:
        return self.disk.format_of(key)

    def layout_of(self, key: Key):
        return self.disk.layout_of(key)

    def record(self, key: Key) -> torch.Tensor:
        """The host record of `key` (resident in the RAM tier: the caller made sure)."""
        return self.ram.slots.raw(self.ram.cache.slot(key))[: self.record_bytes]

    def read_into(self, key: Key, out: torch.Tensor) -> int:
        out[: self.record_bytes].copy_(self.record(key))
        return self.record_bytes

    def close(self) -> None:
        pass


class CopyGuard:
    """Keeps a RAM record pinned until the asynchronous device copy out of it has run (CUDA): the CPU runs
    ahead of the GPU, and a record refilled under an unfinished copy would reach the device corrupted."""

    def __init__(self, cache: ExpertCache) -> None:
        self.cache = cache
        self._held: list[tuple[Key, object]] = []

    def hold(self, key: Key, event) -> None:
        self.cache.pin(key)
        self._held.append((key, event))

    def release_done(self) -> None:
        if self._held:
            keep = []
            for key, event in self._held:
                if event.query():
                    self.cache.unpin(key)
                else:
                    keep.append((key, event))
            self._held = keep
