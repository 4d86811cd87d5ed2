"""Memory planning: what fits where, decided (and printed) before anything big is loaded.

Budgets come from psutil (RAM) and torch.cuda.mem_get_info (GPU), minus headroom; the resident expert
slots get what is left after the non-expert weights and the KV cache at the chosen context.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import psutil
import torch

from offload.config import OffloadConfig, cache_slots, format_bytes
from offload.engine.hot_set import is_trace
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
    ram_capacity: int = 0     # records in the RAM tier (0: none; misses read the store)
    ram_record_bytes: int = 0  # one record as the RAM tier holds it
    miss: str = "copy"        # what a device miss served from RAM does (offload.engine.miss)
    in_place: bool = False    # CPU: the resident slots are the RAM tier, computed in place
    hot_set: str | None = None  # the routing trace (or warm-up text) whose most used experts are pinned
    ram_limit: int = 0        # the tightest memory cgroup limit over this process (0: none)
    active_experts: str | None = None  # LExI's per-layer top-k, described (None: the model's top-k everywhere)
    low_bit: str | None = None  # HOBBIT's low-bit copies, described (None: every miss loads the full record)

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
            ("RAM", f"{size(self.ram_available)} available of {size(self.ram_total)}"
                    + (f" (memory cgroup limit {size(self.ram_limit)})" if self.ram_limit else "")),
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
            ("tiers", self.tiers()),
            ("cache policy", self.policy),
            ("predictor", self.predictor),
            ("CPU threads", str(self.threads)),
        ] + ([("active experts (LExI)", self.active_experts)] if self.active_experts else []) \
          + ([("low-bit copies (HOBBIT)", self.low_bit)] if self.low_bit else [])


    def tiers(self) -> str:
        """The three tiers in one line: what each holds and what a device miss does."""
        size = format_bytes
        disk = f"disk {self.total_experts} records ({size(self.store_bytes)})" if self.store == "disk" else \
            f"checkpoint {self.total_experts} experts (page cache)"
        source = "" if not self.hot_set or is_trace(self.hot_set) else "a warm-up on "
        hot = f" (half pinned: the hot set of {source}{self.hot_set})" if self.hot_set else ""
        if self.in_place:
            return (f"device = RAM tier (CPU, computed in place): {self.capacity} experts "
                    f"({size(self.resident_bytes)}){hot} | {disk}")
        if not self.ram_capacity:
            return f"device {self.capacity} slots{hot} | RAM tier none | {disk}"
        return (f"device {self.capacity} slots{hot} | RAM {self.ram_capacity} records "
                f"({size(self.ram_capacity * self.ram_record_bytes)}), miss={self.miss} | {disk}")


def ram_available() -> int:
    """RAM this process may still use: the system's available memory, or less under a memory cgroup limit (a
    container, `systemd-run -p MemoryMax=`), which psutil does not see."""
    free = psutil.virtual_memory().available
    for limit, anon in cgroup_limits():
        free = min(free, limit - anon)
    return max(0, free)


def cgroup_limits() -> list[tuple[int, int]]:
    """(limit, anonymous bytes in use) of every memory cgroup this process is in, its ancestors included (v1 and
    v2). Page cache is left out of the use: the kernel reclaims it before it enforces the limit."""
    out = []
    try:
        lines = open("/proc/self/cgroup").read().splitlines()
    except OSError:
        return out
    for line in lines:
        _id, controllers, path = line.split(":", 2)
        v2 = controllers == ""
        if not v2 and "memory" not in controllers.split(","):
            continue
        roots = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] if v2 else ["/sys/fs/cgroup/memory"]
        limit_file, anon_key = ("memory.max", "anon") if v2 else ("memory.limit_in_bytes", "total_rss")
        for root in roots:
            parts = [p for p in path.split("/") if p]
            for depth in range(len(parts), -1, -1):
                base = "/".join([root, *parts[:depth]])
                try:
                    raw = open(f"{base}/{limit_file}").read().strip()
                    stat = dict(line.split() for line in open(f"{base}/memory.stat").read().splitlines())
                except (OSError, ValueError):
                    continue
                if raw != "max" and int(raw) < 1 << 60:  # v1 writes "no limit" as a huge number
                    out.append((int(raw), int(stat.get(anon_key, stat.get("rss", 0)))))
    return out


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
    return ram_available()


def make_plan(cfg: OffloadConfig, hf_config, source: CheckpointSource, expert_bytes: int, top_k: int,
              host_bytes: int | None = None) -> MemoryPlan:
    """Choose the number of resident slots and RAM-tier records (unless given) and refuse plans that cannot
    fit. `host_bytes`: one record in the RAM tier's form (next to a GPU: as stored)."""
    c = hf_config.get_text_config()
    context = cfg.context or min(getattr(c, "max_position_embeddings", 4096) or 4096, 4096)
    kv = kv_bytes_per_token(hf_config, cfg.dtype) * context
    from offload.formats.dense_linears import non_expert_bytes

    non_expert = non_expert_bytes(source, hf_config, cfg.dense_bits)
    cpu = cfg.device == "cpu"
    free = device_free(cfg.device)
    avail = free if cpu else ram_available()  # read once: it walks the process's memory cgroups
    vm = psutil.virtual_memory()
    total = len(source.keys())
    budget = free - _headroom(free) - non_expert - kv
    capacity = cache_slots(cfg.cache_experts, cfg.cache_memory, total, expert_bytes)
    ram_memory = cfg.ram_memory if cfg.ram_memory is not None or cpu or cfg.store != "disk" else "auto"
    # a CPU's slots are RAM: one pool, the RAM tier, computed in place (unless copies into a second are asked for)
    in_place = cpu and cfg.store == "disk" and not (cfg.ram_memory is not None and cfg.miss == "copy")
    ram_capacity = 0
    if in_place and ram_memory is not None:
        capacity = max(capacity or 0, ram_slots(ram_memory, total, expert_bytes, budget, top_k))
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
    if in_place:
        ram_capacity = min(capacity, total)
    elif ram_memory is not None:
        ram_budget = (budget - resident) if cpu else (avail - _headroom(avail))
        ram_capacity = ram_slots(ram_memory, total, host_bytes or expert_bytes, ram_budget, top_k)
    limits = [limit for limit, _ in cgroup_limits()]
    return MemoryPlan(device=cfg.device, device_free=free, ram_total=vm.total, ram_available=avail,
                      ram_limit=min(limits, default=0),
                      non_expert_bytes=non_expert, kv_bytes=kv, context=context, expert_bytes=expert_bytes,
                      total_experts=total, store=cfg.store,
                      store_bytes=source.expert_disk_bytes() if cfg.store == "ram" else total * expert_bytes,
                      capacity=min(capacity, total), top_k=top_k, bits=_format_name(cfg), policy=cfg.policy,
                      predictor=_predictor_name(cfg), threads=torch.get_num_threads(), dense_bits=cfg.dense_bits,
                      active_experts=None if cfg.active_experts is None else
                      f"{cfg.active_experts:g} of top-{top_k} per token; per-layer k chosen once the routers load",
                      capped_from=cfg.cache_experts if isinstance(cfg.cache_experts, int) and cfg.cache_experts > total
                      else None, ram_capacity=min(ram_capacity, total),
                      ram_record_bytes=expert_bytes if in_place else (host_bytes or expert_bytes),
                      miss="cpu" if in_place else cfg.miss, in_place=in_place, hot_set=cfg.hot_set)


def _headroom(free: int) -> int:
    return max(int(free * HEADROOM), MIN_HEADROOM)


def ram_slots(ram_memory: int | str, total: int, record_bytes: int, budget: int, top_k: int) -> int:
    """RAM-tier records for `ram_memory` (bytes, a share of all records, or 'auto': what `budget` holds),
    refusing a tier that cannot hold one layer's experts or does not fit."""
    if ram_memory == "auto":
        n = min(total, max(0, budget) // record_bytes)
        if n < top_k:
            raise OffloadError(f"RAM has {format_bytes(max(0, budget))} left for the RAM tier, less than one "
                               f"layer's {top_k} records ({format_bytes(top_k * record_bytes, up=True)}); free "
                               f"memory, lower cache_experts or give ram_memory=SIZE")
        return n
    from offload.config import parse_share

    share = parse_share(ram_memory)
    n = min(total, int(share * total + 1e-9) if share is not None else ram_memory // record_bytes)
    asked = f"ram_memory={_size_option(ram_memory)}"
    if n < top_k:
        raise OffloadError(f"{asked} holds {n} records, fewer than one layer's top-k = {top_k}; give "
                           f"ram_memory={format_bytes(top_k * record_bytes, up=True, sep='')} or more")
    if n * record_bytes > budget:
        fits = max(0, budget) // record_bytes
        raise OffloadError(f"{asked} needs {format_bytes(n * record_bytes)} of RAM, but "
                           f"{format_bytes(max(0, budget))} is left after headroom and what else lives in RAM; "
                           + (f"lower it to at most {fits} records ({format_bytes(fits * record_bytes, sep='')})"
                              if fits >= top_k else "free memory or use a smaller store format (bits=...)"))
    return n


def _size_option(value: int | str) -> str:
    """cache_memory as it reads back: a share stays '25%', bytes become 1.5MiB."""
    return repr(value) if isinstance(value, str) else format_bytes(value, sep="")


def _format_name(cfg: OffloadConfig) -> str:
    from offload.formats.budget import BitsBudget
    from offload.formats.record import format_of

    if isinstance(cfg.bits, dict):
        return ", ".join(f"{k} {format_of(v) or 'dense'}" for k, v in cfg.bits.items())
    if callable(cfg.bits):
        return "per expert (custom)"
    if (budget := BitsBudget.of(cfg.bits)) is not None:
        return f"{budget} (zeros per expert matrix)"
    fmt = format_of(cfg.bits)
    return str(fmt) if fmt is not None else f"dense ({str(cfg.dtype).removeprefix('torch.')})"


def _predictor_name(cfg: OffloadConfig) -> str:
    if cfg.predictor in (None, "none"):
        return "none (experts load on demand)"
    return f"{cfg.predictor}, lookahead {cfg.lookahead}"
