"""Expert cache: which (layer, expert) keys are resident, and who leaves when room is needed.

Pure Python (no torch): the policies and the simulator run on traces anywhere.
"""
from cache.expert_cache import CacheFull, CacheStats, ExpertCache, Key
from cache.policies import POLICIES, CachePolicy, make_policy, policy_for
from cache.simulate import SimResult, hit_rate_curve, replay
from cache.trace import Trace

__all__ = [
    "CacheFull",
    "CacheStats",
    "ExpertCache",
    "Key",
    "POLICIES",
    "CachePolicy",
    "make_policy",
    "policy_for",
    "SimResult",
    "hit_rate_curve",
    "replay",
    "Trace",
]
