"""Memory planning: what fits where, decided (and printed) before anything big is loaded.

Budgets come from psutil (RAM) and torch.cuda.mem_get_info (GPU), minus headroom; the resident expert
slots get what is left after the non-expert weights and the KV cache at the chosen context.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import psutil
import torch

from offload.config import OffloadConfig, cache_slots, format_bytes
from offload.errors import OffloadError
from offload.store.source import CheckpointSource

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
    store_bytes: int          # all experts in the store (ram: the checkpoint's packed bytes on disk)
    capacity: int             # resident expert slots
    top_k: int
    capped_from: int | None = None  # cache_experts as asked, when more than the model has (capped to all of them)
    bits: str = "dense"       # expert format, as the store holds it
    policy: str = "lru"
    predictor: str = "none"
    threads: int = 1          # torch CPU threads
    dense_bits: int | None = None  # width of the non-expert linears (None: the model dtype)
    active_experts: str | None = None  # LExI's per-layer top-k, described (None: the model's top-k everywhere)

    @property
    def resident_bytes(self) -> int:
        return self.capacity * self.expert_bytes

    def as_dict(self) -> dict:
        return {**asdict(self), "resident_bytes": self.resident_bytes}

    def rows(self) -> list[tuple[str, str]]:
        """Human-readable lines, for the CLI and /stats."""
        size = format_bytes
        cpu = self.device == "cpu"  # its free memory is the RAM available: say it once
        return [
            ("compute device", self.device if cpu else f"{self.device} ({size(self.device_free)} free)"),
            ("RAM", f"{size(self.ram_available)} available of {size(self.ram_total)}"),
            ("non-expert weights", size(self.non_expert_bytes) + (f" (linears int{self.dense_bits})"
                                                                  if self.dense_bits else "")),
            (f"KV cache at {self.context} tokens", size(self.kv_bytes)),
            ("experts in store", f"{self.total_experts} x {size(self.expert_bytes)} resident form, "
                                 f"{size(self.store_bytes)} in the {self.store} store"),
            ("expert format", self.bits),
            ("resident experts", f"{self.capacity} of {self.total_experts} "
                                 f"({100 * self.capacity / self.total_experts:.0f}%, {size(self.resident_bytes)})"
                                 + (f"; cache_experts={self.capped_from} capped to the model's {self.total_experts}"
                                    if self.capped_from is not None else "")),
            ("cache policy", self.policy),
            ("predictor", self.predictor),
            ("CPU threads", str(self.threads)),
        ] + ([("active experts (LExI)", self.active_experts)] if self.active_experts else [])


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
    from offload.formats.dense_linears import non_expert_bytes

    non_expert = non_expert_bytes(source, hf_config, cfg.dense_bits)
    free = device_free(cfg.device)
    vm = psutil.virtual_memory()
    total = len(source.keys())
    budget = free - max(int(free * HEADROOM), MIN_HEADROOM) - non_expert - kv
    capacity = cache_slots(cfg.cache_experts, cfg.cache_memory, total, expert_bytes)
    if capacity is None:
        capacity = max(0, min(total, budget // expert_bytes))
        if capacity < top_k:
            raise OffloadError(f"not enough free memory on {cfg.device} for the non-expert weights "
                               f"({format_bytes(non_expert)}), the KV cache at {context} tokens ({format_bytes(kv)}) "
                               f"and {top_k} expert slots; lower context=N, free memory or give "
                               f"cache_experts={top_k}")
    if capacity < top_k:
        need = (f"cache_memory={format_bytes(top_k * expert_bytes, up=True, sep='')}" if cfg.cache_memory is not None
                else f"cache_experts={top_k}")
        raise OffloadError(f"the expert cache must hold at least one layer's top-k = {top_k} experts; "
                           f"give {need} or more")
    resident = min(capacity, total) * expert_bytes
    if resident > budget:  # an explicit size that cannot fit: say so now, not as an out-of-memory kill later
        fits = max(0, budget) // expert_bytes
        asked = (f"cache_experts={cfg.cache_experts!r}" if cfg.cache_experts is not None
                 else f"cache_memory={_size_option(cfg.cache_memory)}")
        raise OffloadError(f"{asked} needs {format_bytes(resident)} of expert slots, but {cfg.device} has "
                           f"{format_bytes(max(0, budget))} left after the non-expert weights "
                           f"({format_bytes(non_expert)}), the KV cache at {context} tokens ({format_bytes(kv)}) "
                           f"and headroom; " + (f"lower it to at most {fits} experts" if fits >= top_k else
                                                "free memory or lower context=N"))
    return MemoryPlan(device=cfg.device, device_free=free, ram_total=vm.total, ram_available=vm.available,
                      non_expert_bytes=non_expert, kv_bytes=kv, context=context, expert_bytes=expert_bytes,
                      total_experts=total, store=cfg.store,
                      store_bytes=source.expert_disk_bytes() if cfg.store == "ram" else total * expert_bytes,
                      capacity=min(capacity, total), top_k=top_k, bits=_format_name(cfg), policy=cfg.policy,
                      predictor=_predictor_name(cfg), threads=torch.get_num_threads(), dense_bits=cfg.dense_bits,
                      active_experts=None if cfg.active_experts is None else
                      f"{cfg.active_experts:g} of top-{top_k} per token; per-layer k chosen once the routers load",
                      capped_from=cfg.cache_experts if isinstance(cfg.cache_experts, int) and cfg.cache_experts > total
                      else None)


def _size_option(value: int | str) -> str:
    """cache_memory as it reads back: a share stays '25%', bytes become 1.5MiB."""
    return repr(value) if isinstance(value, str) else format_bytes(value, sep="")


def _format_name(cfg: OffloadConfig) -> str:
    from offload.formats.record import format_of

    if isinstance(cfg.bits, dict):
        return ", ".join(f"{k} {format_of(v) or 'dense'}" for k, v in cfg.bits.items())
    if callable(cfg.bits):
        return "per expert (custom)"
    fmt = format_of(cfg.bits)
    return str(fmt) if fmt is not None else f"dense ({str(cfg.dtype).removeprefix('torch.')})"


def _predictor_name(cfg: OffloadConfig) -> str:
    if cfg.predictor in (None, "none"):
        return "none (experts load on demand)"
    return f"{cfg.predictor}, lookahead {cfg.lookahead}"
