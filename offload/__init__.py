"""moe-offload: run Mixture-of-Experts models far larger than memory, experts served from a tiered store."""
from offload.config import OffloadConfig
from offload.errors import OffloadError
from offload.model import OffloadedModel

__all__ = ["OffloadConfig", "OffloadError", "OffloadedModel"]
