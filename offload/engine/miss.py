"""What a device miss does when its record is in the RAM tier: one object per strategy.

copy  the record is copied into a device slot and computed there (later uses hit on the device).
cpu   the expert is computed on the CPU straight from its RAM record; nothing is copied.
auto  per miss, whichever the cost model calls cheaper: a copy pays the link once and then every use while
      resident runs at device speed, so it wins for experts that will be reused (kTransformers and Fiddler
      compute RAM experts on the CPU because at batch 1 a PCIe copy costs more than the CPU's GEMV).
"""
from __future__ import annotations

from dataclasses import dataclass

from cache import CacheStats, Key


class CopyOnMiss:
    name = "copy"

    def copy(self, key: Key, weight: float) -> bool:
        return True


class ComputeOnCpu:
    name = "cpu"

    def copy(self, key: Key, weight: float) -> bool:
        return False


@dataclass(frozen=True)
class MissCosts:
    """Seconds per expert at one token, measured at load (`offload.engine.calibrate`)."""

    copy_s: float    # RAM record -> device slot (link + transform)
    cpu_s: float     # the expert computed on the CPU from its RAM record
    device_s: float  # the expert computed on the device from its slot


class CostModelMiss:
    name = "auto"

    def __init__(self, costs: MissCosts, device_stats: CacheStats, prior_hit_rate: float = 0.5) -> None:
        """`device_stats`: the device cache's counters; their hit rate estimates how often a copied expert
        is used again while it stays resident."""
        self.costs, self.device_stats, self.prior = costs, device_stats, prior_hit_rate

    def expected_reuse(self) -> float:
        """Uses after this one while resident: a geometric run at the device hit rate (prior-weighted)."""
        s = self.device_stats
        h = (s.hits + 8 * self.prior) / (s.hits + s.misses + 8)
        return h / (1 - h) if h < 1 else float("inf")

    def copy(self, key: Key, weight: float) -> bool:
        c, uses = self.costs, 1 + self.expected_reuse()
        return c.copy_s + c.device_s * uses < c.cpu_s * uses


def miss_policy(mode: str, costs: MissCosts | None, device_stats: CacheStats):
    """The strategy for `miss=mode` (auto needs the measured costs)."""
    if mode == "copy":
        return CopyOnMiss()
    if mode == "cpu":
        return ComputeOnCpu()
    if costs is None:
        raise ValueError("miss='auto' needs the measured MissCosts")
    return CostModelMiss(costs, device_stats)
