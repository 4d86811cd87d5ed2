"""OffloadedModel: a Hugging Face MoE checkpoint whose experts live in a tiered store behind a cache.

Transformers owns the model; we own the experts. `from_pretrained` swaps every MoE layer's experts
class for a parameter-less subclass before construction, so transformers never reads an expert tensor;
everything else (attention, routers, shared experts, embeddings) loads exactly as transformers loads it.
"""
from __future__ import annotations

import contextlib
import importlib
import re
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.monkey_patching import register_patch_mapping, unregister_patch_mapping

from cache import ExpertCache, make_policy
from offload.arch import Arch, arch_for
from offload.config import OffloadConfig
from offload.convert import open_or_convert
from offload.engine import Engine
from offload.errors import OffloadError
from offload.experts import offloaded_class
from offload.slots import SlotPool
from offload.source import CheckpointSource
from offload.store import RamStore

_LAYER = re.compile(r"layers\.(\d+)\.")


class OffloadedModel:
    """`generate`, `__call__` and `tokenizer` behave as transformers' do; experts come through the cache."""

    def __init__(self, model, engine: Engine, config: OffloadConfig, arch: Arch, source: CheckpointSource,
                 tokenizer=None) -> None:
        self.model, self.engine, self.config, self.arch, self.source = model, engine, config, arch, source
        self.tokenizer = tokenizer

    # --- loading ---------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, model_dir: str | Path, config: OffloadConfig | None = None, progress: bool = False,
                        **options) -> OffloadedModel:
        cfg = config or OffloadConfig.from_options(**options)
        model_dir = _check_dir(model_dir)
        hf_config = _load_config(model_dir)
        arch = arch_for(hf_config)
        text_config = hf_config.get_text_config()
        num_experts = int(getattr(text_config, arch.num_experts))
        top_k = int(text_config.num_experts_per_tok)
        source = CheckpointSource(model_dir, arch, num_experts, cfg.dtype)
        store = _open_store(cfg, source, progress)

        model = _load_model(model_dir, hf_config, arch, cfg)
        moe_layers = []
        for name, module in model.named_modules():
            if type(module).__name__ == "Offloaded" + arch.experts_class:
                module.layer_idx = int(_LAYER.search(name).group(1))
                moe_layers.append(module.layer_idx)
        if sorted(moe_layers) != source.layers:
            raise OffloadError(f"the model has MoE layers {sorted(moe_layers)} but the checkpoint has experts for "
                               f"layers {source.layers}; the checkpoint does not match its config.json")
        capacity = _capacity(cfg, store.record_bytes, len(source.keys()), top_k)
        device = torch.device(cfg.device)
        engine = Engine(store, ExpertCache(capacity, make_policy(cfg.policy)),
                        SlotPool(capacity, store.record_bytes, device), num_experts, top_k, sorted(moe_layers))
        for module in model.modules():
            if getattr(module, "layer_idx", None) is not None and hasattr(module, "engine"):
                module.engine = engine
                if not hasattr(module, "is_transposed"):  # undecorated classes (Llama-4) carry no flags
                    module.is_transposed = arch.transposed
        return cls(model, engine, cfg, arch, source, _load_tokenizer(model_dir))

    # --- running ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor | None = None, **kwargs):
        """transformers' `generate` (greedy, sampling, streamer, eos...), experts served through the cache."""
        if input_ids is not None:
            input_ids = input_ids.to(self.model.device)
        return self.model.generate(input_ids, **kwargs)

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, **kwargs):
        """A plain forward; returns transformers' output (with `.logits`)."""
        return self.model(input_ids.to(self.model.device), **kwargs)

    # --- accounting ------------------------------------------------------------------------------
    def stats(self) -> dict:
        e = self.engine
        c = e.cache.stats
        s = e.stats
        return {
            "hits": c.hits, "misses": c.misses, "hit_rate": c.hit_rate, "evictions": c.evictions,
            "bytes_loaded": dict(s.bytes_loaded), "loads": s.loads, "load_seconds": s.load_seconds,
            "stall_seconds": s.stall_seconds, "tokens": s.tokens,
            "prefetch_issued": s.prefetch_issued, "prefetch_useful": s.prefetch_useful,
            "prefetch_wasted": s.prefetch_issued - s.prefetch_useful - e.prefetcher.pending_unused()
            - e.prefetcher.in_flight(),
            "resident_experts": len(e.cache), "resident_bytes": len(e.cache) * e.slots.record_bytes,
            "capacity_experts": e.cache.capacity, "capacity_bytes": e.slots.nbytes,
            "total_experts": len(self.source.keys()), "expert_bytes": e.slots.record_bytes,
            "store": e.store.tier,
        }

    def reset_stats(self) -> None:
        self.engine.stats.reset()
        c = self.engine.cache.stats
        c.hits = c.misses = c.evictions = c.prefetch_inserts = 0

    def close(self) -> None:
        self.engine.close()
        self.engine.store.close()

    def __enter__(self) -> OffloadedModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- helpers -------------------------------------------------------------------------------------
def _check_dir(model_dir) -> Path:
    path = Path(model_dir).expanduser()
    if not path.exists():
        raise OffloadError(f"model directory {path} does not exist; pass a local Hugging Face checkpoint directory")
    if not path.is_dir():
        raise OffloadError(f"{path} is not a directory; pass the checkpoint's directory (with config.json)")
    if not (path / "config.json").is_file():
        raise OffloadError(f"{path} has no config.json; pass a Hugging Face checkpoint directory "
                           f"(config.json + *.safetensors + tokenizer files)")
    return path


def _load_config(path: Path):
    try:
        return AutoConfig.from_pretrained(path)
    except (ValueError, KeyError, OSError) as e:
        raise OffloadError(f"cannot read {path / 'config.json'}: {str(e).splitlines()[0]}") from None


def _open_store(cfg: OffloadConfig, source: CheckpointSource, progress: bool):
    if cfg.store == "ram":
        return RamStore(source)
    settings = {"dtype": str(cfg.dtype).removeprefix("torch."), "format": "dense"}
    return open_or_convert(source, Path(cfg.store_dir), settings, progress=progress, verify=cfg.verify)


def _capacity(cfg: OffloadConfig, record_bytes: int, total: int, top_k: int) -> int:
    if cfg.cache_experts is not None:
        capacity = cfg.cache_experts
    elif cfg.cache_memory is not None:
        capacity = cfg.cache_memory // record_bytes
    else:
        capacity = total
    if capacity < top_k:
        need = f"{top_k * record_bytes / 2**20:.2f} MiB" if cfg.cache_memory is not None else f"{top_k} experts"
        raise OffloadError(f"the expert cache must hold at least one layer's top-k = {top_k} experts ({need}); "
                           f"raise cache_experts to >= {top_k} or cache_memory to >= {top_k * record_bytes} bytes")
    return min(capacity, total)


def _load_model(path: Path, hf_config, arch: Arch, cfg: OffloadConfig):
    model_cls = AutoModelForCausalLM._model_mapping[type(hf_config)]
    orig = getattr(importlib.import_module(model_cls.__module__), arch.experts_class)
    register_patch_mapping({arch.experts_class: offloaded_class(orig)}, overwrite=True)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the dropped expert tensors are reported as "unexpected"
    try:
        kwargs = {"device_map": {"": cfg.device}} if cfg.device != "cpu" else {}
        model = AutoModelForCausalLM.from_pretrained(path, dtype=cfg.dtype, **kwargs)
    finally:
        unregister_patch_mapping([arch.experts_class])
        transformers.logging.set_verbosity(verbosity)
    return model.eval()


def _load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    with contextlib.suppress(Exception):
        return AutoTokenizer.from_pretrained(path)
    return None
