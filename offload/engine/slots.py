"""SlotPool: the resident tier. A fixed [capacity, record_bytes] buffer on the compute device.

Allocated once; a slot's tensors are views into it, so nothing allocates in the hot path (vLLM's
expert-cache lesson). Which key sits in which slot is decided by `cache.ExpertCache`, not here. On CPU
every slot starts on an ALIGN boundary and spans a whole number of ALIGN blocks, so the disk store's direct
reads land in it without a bounce buffer.
"""
from __future__ import annotations

import mmap

import torch

from offload.store.layout import ExpertLayout
from offload.store.disk import aligned_buffer, round_up


class SlotPool:
    def __init__(self, capacity: int, record_bytes: int, device: torch.device, shared: bool = False,
                 pinned: bool = False) -> None:
        """`shared`: CPU slots in an anonymous shared mapping, so a forked loader process writes into the
        same memory (no /dev/shm needed: containers often cap it at 64 MB). `pinned`: CPU slots in page-locked
        memory (a RAM tier feeding a GPU: copies from it run asynchronously; CUDA pins page-aligned)."""
        self.capacity, self.record_bytes, self.device = capacity, record_bytes, torch.device(device)
        cpu = self.device.type == "cpu"
        self.shared = shared and cpu
        self.stride = round_up(record_bytes) if cpu else record_bytes  # bytes from one slot to the next
        if self.shared:
            self._map = mmap.mmap(-1, capacity * self.stride)  # MAP_SHARED | MAP_ANONYMOUS, zero-filled, page-aligned
            self.buf = torch.frombuffer(self._map, dtype=torch.uint8).view(capacity, self.stride)
        elif cpu and pinned and torch.cuda.is_available():
            self.buf = torch.zeros(capacity, self.stride, dtype=torch.uint8, pin_memory=True)
        elif cpu:
            self.buf = aligned_buffer(capacity * self.stride).zero_().view(capacity, self.stride)
        else:
            self.buf = torch.zeros(capacity, record_bytes, dtype=torch.uint8, device=self.device)
        self._views: dict[tuple[int, int], dict[str, torch.Tensor]] = {}

    @property
    def nbytes(self) -> int:
        return self.capacity * self.stride

    def raw(self, slot: int) -> torch.Tensor:
        return self.buf[slot]

    def views(self, slot: int, layout: ExpertLayout) -> dict[str, torch.Tensor]:
        """Named tensors of `slot` under `layout`, built once and reused."""
        key = (slot, id(layout))
        v = self._views.get(key)
        if v is None:
            v = self._views[key] = layout.views(self.buf[slot])
        return v
