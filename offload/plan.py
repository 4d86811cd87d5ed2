"""Memory planning: what fits where, decided (and printed) before anything big is loaded.

Budgets come from psutil (RAM) and torch.cuda.mem_get_info (GPU), minus headroom; the resident expert
slots get what is left after the non-expert weights and the KV cache at the chosen context.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import psutil
import torch

from offload.config import OffloadConfig
from offload.errors import OffloadError
from offload.source import CheckpointSource

HEADROOM = 0.10          # of the device budget, kept free for activations and the allocator
MIN_HEADROOM = 256 << 20


@dataclass(frozen=True)
class MemoryPlan:
    device: str
    device_free: int          # bytes free on the compute device (RAM for cpu)
    ram_total: int
    ram_available: int
    non_expert_bytes: int     # attention, embeddings, routers, shared experts, dense layers
    kv_bytes: int             # KV cache at `context` tokens
    context: int
    expert_bytes: int         # one expert record
    total_experts: int
    store: str                # where the non-resident experts live
    store_bytes: int          # all experts in the store
    capacity: int             # resident expert slots
    top_k: int
    dense_bits: int | None = None  # width of the non-expert linears (None: the model dtype)

    @property
    def resident_bytes(self) -> int:
        return self.capacity * self.expert_bytes

    def as_dict(self) -> dict:
        return {**asdict(self), "resident_bytes": self.resident_bytes}

    def rows(self) -> list[tuple[str, str]]:
        """Human-readable lines, for the CLI and /stats."""
        gib = lambda n: f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"  # noqa: E731
        return [
            ("compute device", f"{self.device} ({gib(self.device_free)} free)"),
            ("RAM", f"{gib(self.ram_available)} available of {gib(self.ram_total)}"),
            ("non-expert weights", gib(self.non_expert_bytes) + (f" (linears int{self.dense_bits})"
                                                                 if self.dense_bits else "")),
            (f"KV cache at {self.context} tokens", gib(self.kv_bytes)),
            ("experts in store", f"{self.total_experts} x {gib(self.expert_bytes)} = {gib(self.store_bytes)} "
                                 f"({self.store})"),
            ("resident experts", f"{self.capacity} of {self.total_experts} "
                                 f"({100 * self.capacity / self.total_experts:.0f}%, {gib(self.resident_bytes)})"),
        ]


def kv_bytes_per_token(hf_config, dtype: torch.dtype) -> int:
    c = hf_config.get_text_config()
    layers = c.num_hidden_layers
    if getattr(c, "kv_lora_rank", None):  # MLA (DeepSeek): transformers caches full K and V per head
        heads = c.num_attention_heads
        k_dim = getattr(c, "qk_nope_head_dim", 0) + getattr(c, "qk_rope_head_dim", 0)
        return layers * heads * (k_dim + c.v_head_dim) * dtype.itemsize
    heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * layers * heads * head_dim * dtype.itemsize


def device_free(device: str) -> int:
    if device.startswith("cuda"):
        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return free
    return psutil.virtual_memory().available


def make_plan(cfg: OffloadConfig, hf_config, source: CheckpointSource, expert_bytes: int, top_k: int) -> MemoryPlan:
    """Choose the number of resident slots (unless given) and refuse plans that cannot fit."""
    c = hf_config.get_text_config()
    context = cfg.context or min(getattr(c, "max_position_embeddings", 4096) or 4096, 4096)
    kv = kv_bytes_per_token(hf_config, cfg.dtype) * context
    from offload.dense import non_expert_bytes

    non_expert = non_expert_bytes(source, hf_config, cfg.dense_bits)
    free = device_free(cfg.device)
    vm = psutil.virtual_memory()
    total = len(source.keys())
    budget = free - max(int(free * HEADROOM), MIN_HEADROOM) - non_expert - kv
    if cfg.cache_experts is not None:
        capacity = cfg.cache_experts
    elif cfg.cache_memory is not None:
        capacity = cfg.cache_memory // expert_bytes
    else:
        capacity = max(0, min(total, budget // expert_bytes))
    if capacity < top_k:
        if cfg.cache_experts is None and cfg.cache_memory is None:
            raise OffloadError(f"not enough free memory on {cfg.device} for the non-expert weights "
                               f"({non_expert / 2**20:.0f} MiB), the KV cache at {context} tokens "
                               f"({kv / 2**20:.0f} MiB) and {top_k} expert slots; lower --context, free memory or "
                               f"pass --cache-experts {top_k}")
        need = f"{top_k * expert_bytes / 2**20:.2f} MiB" if cfg.cache_memory is not None else f"{top_k} experts"
        raise OffloadError(f"the expert cache must hold at least one layer's top-k = {top_k} experts ({need}); "
                           f"raise cache_experts to >= {top_k} or cache_memory to >= {top_k * expert_bytes} bytes")
    resident = min(capacity, total) * expert_bytes
    if resident > budget:  # an explicit size that cannot fit: say so now, not as an out-of-memory kill later
        fits = max(0, budget) // expert_bytes
        asked = (f"cache_experts={cfg.cache_experts}" if cfg.cache_experts is not None
                 else f"cache_memory={cfg.cache_memory}")
        raise OffloadError(f"{asked} needs {resident / 2**20:.0f} MiB of expert slots, but {cfg.device} has "
                           f"{max(0, budget) / 2**20:.0f} MiB left after the non-expert weights "
                           f"({non_expert / 2**20:.0f} MiB), the KV cache at {context} tokens ({kv / 2**20:.0f} MiB) "
                           f"and headroom; " + (f"lower it to at most {fits} experts" if fits >= top_k else
                                                "free memory or lower --context"))
    return MemoryPlan(device=cfg.device, device_free=free, ram_total=vm.total, ram_available=vm.available,
                      non_expert_bytes=non_expert, kv_bytes=kv, context=context, expert_bytes=expert_bytes,
                      total_experts=total, store=cfg.store, store_bytes=total * expert_bytes,
                      capacity=min(capacity, total), top_k=top_k, dense_bits=cfg.dense_bits)
