"""Expert cache: which (layer, expert) keys are resident, and who leaves when room is needed.

Pure Python (no torch): the policies and the simulator run on traces anywhere.
"""
from cache.expert_cache import CacheFull, CacheStats, ExpertCache, Key
from cache.policies import POLICIES, CachePolicy, make_policy

__all__ = ["CacheFull", "CacheStats", "ExpertCache", "Key", "POLICIES", "CachePolicy", "make_policy"]
