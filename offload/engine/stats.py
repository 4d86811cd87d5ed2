"""EngineStats: every byte moved, every wait and every prefetch, counted in one place."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field


@dataclass
class EngineStats:
    bytes_loaded: dict[str, int] = field(default_factory=lambda: defaultdict(int))  # per tier: ram, disk
    loads: int = 0                 # records copied into a slot (demand + prefetch)
    load_seconds: float = 0.0      # time spent reading/decoding records (any thread)
    stall_seconds: float = 0.0     # main thread waiting for an expert (demand loads + unfinished prefetches)
    prefetch_issued: int = 0
    prefetch_useful: int = 0       # prefetched and then used before eviction
    prefetch_dropped: int = 0      # predicted but no slot could be freed (everything pinned)
    prefetch_suppressed: int = 0   # predicted but not fetched: recent predictions were too often wrong
    prefetch_cancelled: int = 0    # issued, proved wrong by the router before the worker started it: never read
    tokens: int = 0                # tokens passed through the first MoE layer (prefill + decode)

    def reset(self) -> None:
        self.__init__()
