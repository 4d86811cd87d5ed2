"""OffloadConfig: every option of the engine, validated once, frozen afterwards."""
from __future__ import annotations

import re
from dataclasses import dataclass, fields

import torch

from offload.errors import OffloadError

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "float32": torch.float32, "fp32": torch.float32, "float": torch.float32}
STORES = ("ram", "disk")


def parse_bytes(value: int | str) -> int:
    """'2GiB', '512MB', '1.5 GB' or an int -> bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise OffloadError(f"cannot read {value!r} as a size; write it like 2GiB, 512MB or 1000000")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_dtype(value: str | torch.dtype) -> torch.dtype:
    if isinstance(value, torch.dtype):
        if value in DTYPES.values():
            return value
    elif str(value).removeprefix("torch.") in DTYPES:
        return DTYPES[str(value).removeprefix("torch.")]
    raise OffloadError(f"unsupported dtype {value!r}; use bfloat16, float16 or float32")


@dataclass(frozen=True)
class OffloadConfig:
    """How experts are stored, cached and computed. Everything else about the model is transformers' business."""

    device: str = "cpu"                 # where resident experts live and compute runs: cpu, cuda, cuda:N
    dtype: str | torch.dtype = "bfloat16"  # model and dense expert records; as transformers' `dtype`
    store: str = "ram"                  # ram: read the checkpoint's safetensors on demand (mmap); disk: converted store
    store_dir: str | None = None        # where the disk store lives (required for store="disk")
    bits: int | str | dict | None = None  # expert format: None/16 dense, 8, 4, 3, 2, "ternary", or per-layer dict
    dense_bits: int | None = None       # non-expert linears (attention, shared experts, lm_head): 8, 4 or None
                                        # (the checkpoint dtype); routers and embeddings keep their dtype
    cache_experts: int | None = None    # resident expert slots (global across layers)
    cache_memory: int | str | None = None  # or a byte budget for the slots: 2GiB, 512MB...
    policy: str = "lru"                 # eviction policy (cache.POLICIES)
    predictor: str | None = None        # expert predictor for prefetch (predictors.PREDICTORS); None = demand only
    lookahead: int = 1                  # MoE layers the predictor looks ahead (0: from the layer's own entry)
    prefetch_width: int | None = None   # experts prefetched per predicted layer (default: top_k)
    prefetch_min_precision: float = 0.75  # pause prefetching while fewer predictions than this come true
    prefetch_worker: str = "auto"       # who loads prefetches: process (CPU, Linux), thread, or auto (process
                                        # where it can: a thread contends with compute for the GIL)
    context: int | None = None          # tokens of KV cache to plan for (default: min(model max, 4096))
    trace: bool = False                 # record routing (experts and weights per token and layer)
    verify: bool = True                 # check each record's checksum when it is read from the disk store
    direct_io: bool = True              # read the disk store with O_DIRECT, bypassing the page cache (buffered
                                        # reads where the filesystem has no direct I/O)

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", parse_dtype(self.dtype))
        if not re.fullmatch(r"cpu|cuda(:\d+)?", str(self.device)):
            raise OffloadError(f"device must be cpu, cuda or cuda:N, got {self.device!r}")
        if str(self.device).startswith("cuda") and not torch.cuda.is_available():
            raise OffloadError("device='cuda' was asked for but torch sees no CUDA GPU; use device='cpu'")
        if self.store not in STORES:
            raise OffloadError(f"store must be one of {', '.join(STORES)}, got {self.store!r}")
        if self.store == "disk" and not self.store_dir:
            raise OffloadError("store='disk' needs store_dir=PATH (where the converted expert store is kept)")
        if self.cache_experts is not None and self.cache_memory is not None:
            raise OffloadError("give either cache_experts or cache_memory, not both")
        if self.cache_experts is not None and (not isinstance(self.cache_experts, int) or self.cache_experts < 1):
            raise OffloadError(f"cache_experts must be a positive integer, got {self.cache_experts!r}")
        if self.cache_memory is not None:
            object.__setattr__(self, "cache_memory", parse_bytes(self.cache_memory))
            if self.cache_memory <= 0:
                raise OffloadError("cache_memory must be positive, e.g. 2GiB")
        if self.bits not in (None, 16):
            from offload.codec import format_rule

            format_rule(self.bits)(0, 0)  # parses every entry: bad formats fail here, with the fix named
            if self.store != "disk":
                raise OffloadError(f"bits={self.bits!r} needs a converted store: add store='disk' and "
                                   f"store_dir=PATH (converted once, reused afterwards)")
        if self.dense_bits is not None and (isinstance(self.dense_bits, bool) or self.dense_bits not in (8, 4)):
            raise OffloadError(f"dense_bits must be 8 or 4 (or None), got {self.dense_bits!r}")
        if self.dense_bits is not None and str(self.device).startswith("cuda"):
            raise OffloadError("dense_bits runs on torch's CPU int8/int4 kernels; use device='cpu' or dense_bits=None")
        if self.context is not None and self.context < 1:
            raise OffloadError(f"context must be a positive number of tokens, got {self.context}")
        if not 0 <= self.lookahead <= 8:
            raise OffloadError(f"lookahead must be between 0 and 8, got {self.lookahead}")
        if not 0.0 <= self.prefetch_min_precision <= 1.0:
            raise OffloadError(f"prefetch_min_precision must be in [0, 1], got {self.prefetch_min_precision}")
        if self.prefetch_worker not in ("auto", "process", "thread"):
            raise OffloadError(f"prefetch_worker must be auto, process or thread, got {self.prefetch_worker!r}")
        if self.prefetch_worker == "process" and str(self.device).startswith("cuda"):
            raise OffloadError("prefetch_worker='process' is for device='cpu'; CUDA copies run on a thread "
                               "(use prefetch_worker='auto')")
        if self.prefetch_width is not None and self.prefetch_width < 1:
            raise OffloadError(f"prefetch_width must be at least 1, got {self.prefetch_width}")
        from cache import POLICIES  # late: keeps `offload.config` importable alone
        from predictors import PREDICTORS

        online = sorted(set(PREDICTORS) - {"oracle"})
        if self.predictor is not None and self.predictor not in online:
            raise OffloadError(f"unknown predictor {self.predictor!r}; choose one of: {', '.join(online)} "
                               f"(oracle runs only on recorded traces, in offload-bench)")

        if self.policy not in POLICIES:
            raise OffloadError(f"unknown policy {self.policy!r}; choose one of: {', '.join(sorted(POLICIES))}")

    @classmethod
    def from_options(cls, **options) -> OffloadConfig:
        """Like OffloadConfig(**options), but an unknown option is an OffloadError naming the valid ones."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise OffloadError(f"unknown option(s) {', '.join(unknown)}; valid options: {', '.join(sorted(names))}")
        return cls(**options)
