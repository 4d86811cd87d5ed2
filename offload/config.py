"""OffloadConfig: every option of the engine, validated once, frozen afterwards."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields

import torch

from offload.errors import OffloadError

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "float32": torch.float32, "fp32": torch.float32, "float": torch.float32}
STORES = ("ram", "disk")
MISS_MODES = ("auto", "copy", "cpu")
LOW_BIT_THRESHOLD = 0.25  # low_bit_threshold when only low_bit_miss is given


def parse_bytes(value: int | str) -> int:
    """'2GiB', '512MB', '1.5 GB' or an int -> bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise OffloadError(f"cannot read {value!r} as a size; write it like 2GiB, 512MB or 1000000")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_bytes(n: float, up: bool = False, sep: str = " ") -> str:
    """Bytes as KiB/MiB/GiB for people; `up` rounds up (a minimum that must still suffice), `sep=""` makes
    a value that reads back as an option (cache_memory=1.5MiB)."""
    unit, scale = next((u, s) for u, s in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)) if n >= s or u == "KiB")
    digits = 2 if unit == "GiB" else 1
    value = math.ceil(n / scale * 10**digits) / 10**digits if up else n / scale
    return f"{value:.{digits}f}{sep}{unit}"


def parse_share(value: object) -> float | None:
    """'25%' -> 0.25; None for anything that is not a percentage."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*%\s*", value) if isinstance(value, str) else None
    return float(m.group(1)) / 100 if m else None


def cache_slots(cache_experts: int | str | None, cache_memory: int | str | None, total: int,
                expert_bytes: int) -> int | None:
    """Resident slots for a cache size (None: none was given): a count, a share of all `total` experts, a byte
    budget, or a share of all expert bytes (rounded down: a budget is a ceiling)."""
    if cache_experts is not None:
        share = parse_share(cache_experts)
        return int(cache_experts) if share is None else max(1, round(share * total))
    if cache_memory is not None:
        share = parse_share(cache_memory)
        return parse_bytes(cache_memory) // expert_bytes if share is None else int(share * total + 1e-9)
    return None


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
    store: str | None = None            # ram: read the checkpoint's safetensors on demand (mmap); disk: converted
                                        # store. Default: disk when store_dir is given, else ram
    store_dir: str | None = None        # where the disk store lives (required for store="disk")
    bits: int | str | dict | None = None  # expert format: None/16 dense, 8, 4, 3, 2, "ternary", or per-layer dict
    dense_bits: int | None = None       # non-expert linears (attention, shared experts, lm_head): 8, 4 or None
                                        # (the checkpoint dtype); routers and embeddings keep their dtype
    cache_experts: int | str | None = None  # resident expert slots (global across layers): 16, or "25%" of all
    cache_memory: int | str | None = None  # or a byte budget for the slots: 2GiB, 512MB, or "25%" of all experts' bytes
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

    calibration: str | None = None      # a text file: quantize experts with GPTQ on its routed activations
                                        # (int4/int3/int2, ternary) when converting the disk store
    entropy_coder: str = "lzma"         # how the disk store codes sparse ternary records: lzma or dict16
                                        # (QMoE's Tunstall dictionary; docs/formats.md measures both)
    ram_memory: int | str | None = None  # RAM tier of stored records between the disk store and the device:
                                        # 64GiB, "50%" of all records, or "auto" (free RAM minus headroom)
    miss: str = "auto"                  # a device miss whose record is in RAM: copy it into a device slot, compute
                                        # it on the CPU from RAM, or auto (the cost model measured at load)
    hot_set: str | None = None          # a routing trace (.npz), or a text whose first 512 tokens are run once:
                                        # the experts they use most stay pinned in half the device slots (a
                                        # static hot set), the rest is a dynamic cache
    active_experts: float | None = None  # LExI: per-layer top-k averaging this fraction of the model's top-k
                                        # (0 < f <= 1), chosen from the weights alone; None: the model's top-k
    low_bit_miss: str | None = None     # HOBBIT: a low-bit copy of every expert in this format (e.g. "int2-g32"),
                                        # computed from RAM on a low-weight miss instead of loading the full record
    low_bit_threshold: float | None = None  # routing weight below which a miss is served low-bit (default 0.25
                                        # with low_bit_miss; 0: never, the same outputs as without)

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", parse_dtype(self.dtype))
        if not re.fullmatch(r"cpu|cuda(:\d+)?", str(self.device)):
            raise OffloadError(f"device must be cpu, cuda or cuda:N, got device={self.device!r}")
        if str(self.device).startswith("cuda") and not torch.cuda.is_available():
            raise OffloadError(f"device={self.device!r} was asked for but torch sees no CUDA GPU; use device='cpu'")
        if self.store is None:  # a store_dir only means something for a disk store: giving one asks for it
            object.__setattr__(self, "store", "disk" if self.store_dir else "ram")
        if self.store not in STORES:
            raise OffloadError(f"store must be one of {', '.join(STORES)}, got store={self.store!r}")
        if self.store == "ram" and self.store_dir:
            raise OffloadError(f"store_dir={self.store_dir} is for the disk store, but store='ram' reads the "
                               f"checkpoint itself; drop store='ram' to use the disk store, or drop store_dir")
        if self.store == "disk" and not self.store_dir:
            raise OffloadError("store='disk' needs store_dir=PATH (where the converted expert store is kept)")
        if self.cache_experts is not None and self.cache_memory is not None:
            raise OffloadError("give either cache_experts=N or cache_memory=SIZE, not both")
        if self.cache_experts is not None:
            object.__setattr__(self, "cache_experts", _experts(self.cache_experts))
        if self.cache_memory is not None:
            given, share = self.cache_memory, parse_share(self.cache_memory)
            if share is None:
                object.__setattr__(self, "cache_memory", parse_bytes(self.cache_memory))
            if not (0 < share <= 1 if share is not None else self.cache_memory > 0):
                raise OffloadError(f"cache_memory={given!r} is not a positive size or a share of all expert bytes; "
                                   f"write it like cache_memory=2GiB or cache_memory='25%' (at most 100%)")
        if self.bits not in (None, 16):
            from offload.formats.record import format_rule

            format_rule(self.bits)(0, 0)  # parses every entry: bad formats fail here, with the fix named
            from offload.formats.budget import BitsBudget

            if BitsBudget.of(self.bits) is not None and (self.calibration is None or self.entropy_coder != "lzma"):
                raise OffloadError(f"bits={self.bits!r} chooses each matrix's zeros from calibrated output error and "
                                   f"sizes them with lzma; add calibration=FILE (--calibration FILE) and keep "
                                   f"entropy_coder='lzma', or use a fixed share such as 'ternary-z80'")
            if self.store != "disk":
                raise OffloadError(f"bits={self.bits!r} needs a converted store: add store='disk' and "
                                   f"store_dir=PATH (converted once, reused afterwards)")
        if self.calibration is not None:
            from pathlib import Path

            if self.bits in (None, 16):
                raise OffloadError(f"calibration={self.calibration} quantizes experts, but bits is dense; give a "
                                   f"quantized format too, e.g. bits='int4-g32' (--bits int4-g32)")
            if not Path(self.calibration).is_file():
                raise OffloadError(f"calibration file {self.calibration} not found; pass an existing text file "
                                   f"(--calibration FILE)")
        from offload.store.codec import ENTROPY_CODERS

        if self.entropy_coder not in ENTROPY_CODERS:
            raise OffloadError(f"entropy_coder must be one of {', '.join(ENTROPY_CODERS)}, got "
                               f"entropy_coder={self.entropy_coder!r} (--entropy-coder)")
        if self.dense_bits is not None and (isinstance(self.dense_bits, bool) or self.dense_bits not in (8, 4)):
            raise OffloadError(f"dense_bits must be 8 or 4 (or None), got {self.dense_bits!r}")
        if self.dense_bits is not None and str(self.device).startswith("cuda"):
            raise OffloadError("dense_bits runs on torch's CPU int8/int4 kernels; use device='cpu' or dense_bits=None")
        if self.ram_memory is not None:
            self._check_ram_memory()
        if self.miss not in MISS_MODES:
            raise OffloadError(f"miss must be one of {', '.join(MISS_MODES)}, got miss={self.miss!r}")
        if self.miss == "cpu" and self.ram_memory is None:
            raise OffloadError("miss='cpu' computes experts from their RAM-tier records; give ram_memory=SIZE "
                               "(or 'auto'), or drop miss")
        if self.hot_set is not None:
            from pathlib import Path

            if not Path(self.hot_set).is_file():
                raise OffloadError(f"hot_set {self.hot_set} not found; give a routing trace (.npz, offload-bench "
                                   f"trace) or a text to warm up on")
        if self.active_experts is not None and (isinstance(self.active_experts, bool) or not isinstance(
                self.active_experts, (int, float)) or not 0 < self.active_experts <= 1):
            raise OffloadError(f"active_experts must be a fraction of the top-k in (0, 1], e.g. active_experts=0.75, "
                               f"got {self.active_experts!r}")
        self._check_low_bit()
        if self.context is not None and self.context < 1:
            raise OffloadError(f"context must be a positive number of tokens, got context={self.context}")
        if not 0 <= self.lookahead <= 8:
            raise OffloadError(f"lookahead must be between 0 and 8, got lookahead={self.lookahead}")
        if not 0.0 <= self.prefetch_min_precision <= 1.0:
            raise OffloadError(f"prefetch_min_precision must be in [0, 1], got "
                               f"prefetch_min_precision={self.prefetch_min_precision}")
        if self.prefetch_worker not in ("auto", "process", "thread"):
            raise OffloadError(f"prefetch_worker must be auto, process or thread, got {self.prefetch_worker!r}")
        if self.prefetch_worker == "process" and str(self.device).startswith("cuda"):
            raise OffloadError("prefetch_worker='process' is for device='cpu'; CUDA copies run on a thread "
                               "(use prefetch_worker='auto')")
        if self.prefetch_width is not None and self.prefetch_width < 1:
            raise OffloadError(f"prefetch_width must be at least 1, got prefetch_width={self.prefetch_width}")
        from cache import POLICIES  # late: keeps `offload.config` importable alone
        from predictors import PREDICTORS

        online = sorted(set(PREDICTORS) - {"oracle"})
        if self.predictor is not None and self.predictor not in online:
            raise OffloadError(f"unknown predictor {self.predictor!r}; choose one of: {', '.join(online)} "
                               f"(oracle runs only on recorded traces, in offload-bench)")

        policies = sorted(set(POLICIES) - {"belady"})
        if self.policy == "belady":
            raise OffloadError(f"the belady policy needs the future routing, so it runs only on recorded traces "
                               f"(offload-bench policies); for a model choose one of: {', '.join(policies)}")
        if self.policy not in policies:
            raise OffloadError(f"unknown policy {self.policy!r}; choose one of: {', '.join(policies)}")

    def _check_ram_memory(self) -> None:
        given = self.ram_memory
        if self.store != "disk":
            raise OffloadError(f"ram_memory={given!r} is a RAM tier in front of a converted store; add "
                               f"store_dir=PATH (store='ram' already reads the checkpoint through the page cache)")
        if given == "auto":
            return
        share = parse_share(given)
        if share is None:
            object.__setattr__(self, "ram_memory", parse_bytes(given))
        if not (0 < share <= 1 if share is not None else self.ram_memory > 0):
            raise OffloadError(f"ram_memory={given!r} is not a positive size, a share of all expert records or "
                               f"'auto'; write it like ram_memory=64GiB, ram_memory='50%' or ram_memory=auto")

    def _check_low_bit(self) -> None:
        t = self.low_bit_threshold
        if self.low_bit_miss is None:
            if t is not None:
                raise OffloadError(f"low_bit_threshold={t!r} needs a low-bit copy to serve misses with; add "
                                   f"low_bit_miss=int2-g32 (or another quantized format), or drop low_bit_threshold")
            return
        from offload.formats.record import format_of

        if not isinstance(self.low_bit_miss, str) or format_of(self.low_bit_miss) is None:
            raise OffloadError(f"low_bit_miss must be a quantized format like 'int2-g32', got "
                               f"low_bit_miss={self.low_bit_miss!r}")
        if self.store != "disk":
            raise OffloadError("low_bit_miss keeps its low-bit copy in a converted store; add store_dir=PATH "
                               "(converted once, reused afterwards)")
        if self.ram_memory is not None:
            raise OffloadError("low_bit_miss is not combined with a RAM tier yet; drop ram_memory or low_bit_miss")
        if t is None:
            object.__setattr__(self, "low_bit_threshold", LOW_BIT_THRESHOLD)
        elif isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t <= 1:
            raise OffloadError(f"low_bit_threshold must be a routing weight in [0, 1], e.g. low_bit_threshold=0.25, "
                               f"got {t!r}")

    @classmethod
    def from_options(cls, **options) -> OffloadConfig:
        """Like OffloadConfig(**options), but an unknown option is an OffloadError naming the valid ones."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise OffloadError(f"unknown option(s) {', '.join(unknown)}; valid options: {', '.join(sorted(names))}")
        return cls(**options)


def _experts(value: int | str) -> int | str:
    """cache_experts as a slot count or a normalised share ('25%'); anything else names both forms."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    share = parse_share(value)
    if share is not None and 0 < share <= 1:
        return f"{100 * share:g}%"
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise OffloadError(f"cache_experts={value!r} is not a slot count or a share of all experts; write it like "
                       f"cache_experts=16 or cache_experts='25%' (at most 100%)")
