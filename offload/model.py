"""OffloadedModel: a Hugging Face MoE checkpoint whose experts live in a tiered store behind a cache.

Transformers owns the model; we own the experts. `from_pretrained` swaps every MoE layer's experts
class for a parameter-less subclass before construction, so transformers never reads an expert tensor;
everything else (attention, routers, shared experts, embeddings) loads exactly as transformers loads it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import re
import weakref
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM
from transformers.monkey_patching import register_patch_mapping, unregister_patch_mapping

from cache import ExpertCache, Trace, policy_for
from offload.engine.active_experts import ActiveExperts, check_active_experts
from offload.store.arch import Arch
from offload.config import OffloadConfig, format_bytes
from offload.store.convert import codec_for, low_bit_codec, open_low_bit_store, open_store
from offload.engine.low_bit import LowBitMiss
from offload.engine.step import Engine
from offload.engine.costs import measure_costs
from offload.engine.miss import miss_policy
from offload.engine.ram_tier import RamTier
from offload.formats.record import RecordCodec, matrix_shapes
from offload.errors import OffloadError
from offload.engine.experts import offloaded_class
from offload.engine.hooks import hook_attention_outputs, hook_layer_entries
from offload.plan import MemoryPlan, make_plan
from offload.engine.slots import SlotPool
from offload.store.disk import round_up
from offload.store.source import CheckpointSource, open_checkpoint
from offload.engine.tracer import Tracer

_LAYER = re.compile(r"layers\.(\d+)\.")


class OffloadedModel:
    """`generate`, `__call__` and `tokenizer` behave as transformers' do; experts come through the cache."""

    def __init__(self, model, engine: Engine, config: OffloadConfig, arch: Arch, source: CheckpointSource,
                 plan: MemoryPlan, tokenizer=None, hooks: list | None = None) -> None:
        self.model, self.engine, self.config, self.arch, self.source = model, engine, config, arch, source
        self.plan, self.tokenizer = plan, tokenizer
        # stops the prefetch worker and removes our forward hooks when closed or dropped
        self._finalizer = weakref.finalize(self, _shutdown, engine, hooks or [])

    # --- loading ---------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, model_dir: str | Path, config: OffloadConfig | None = None, progress: bool = False,
                        on_plan: Callable[[MemoryPlan], None] | None = None, **options) -> OffloadedModel:
        """Load `model_dir` with experts offloaded. `options` are OffloadConfig fields; `on_plan` sees the
        memory plan before anything big is loaded (the CLI prints it)."""
        cfg = config or OffloadConfig.from_options(**options)
        hf_config, arch, source, top_k = open_checkpoint(model_dir, cfg.dtype)
        if cfg.dense_bits is not None and source.format.name != "dense":
            raise OffloadError("dense_bits with a packed (FP8/MXFP4) checkpoint is not supported yet; drop "
                               "dense_bits (--dense-bits)")
        if cfg.active_experts is not None:  # refused (Llama-4, too small a fraction) before anything loads
            check_active_experts(cfg.active_experts, hf_config, top_k)
        if cfg.low_bit_miss is not None and hf_config.model_type in ("llama4", "llama4_text"):
            raise OffloadError("low_bit_miss needs each expert's routing weight, which Llama-4 folds into its input; "
                               "drop low_bit_miss")
        model_dir, num_experts = source.model_dir, source.num_experts
        codec = codec_for(cfg, source, arch)
        slot_bytes = source.layout.nbytes if codec is None else codec.slot_bytes  # dense or quantized compute form
        host_codec = None if codec is None else RecordCodec(codec.dense, codec.rule, codec.transposed, torch.device("cpu"))
        # a RAM record: compute form on a CPU engine (computed in place), as stored next to a GPU
        host_bytes = (source.layout.nbytes if codec is None else
                      host_codec.slot_bytes if cfg.device == "cpu" else codec.record_bytes)
        plan = make_plan(cfg, hf_config, source, slot_bytes, top_k, host_bytes)
        low_codec = None if cfg.low_bit_miss is None else low_bit_codec(cfg, source, arch)
        if low_codec is not None:
            n = len(source.keys())
            plan = dataclasses.replace(plan, low_bit=f"{cfg.low_bit_miss}, {n} records in RAM "
                                                     f"({format_bytes(n * round_up(low_codec.slot_bytes))}), serving a miss "
                                                     f"under routing weight {cfg.low_bit_threshold:g}")
        if on_plan is not None:
            on_plan(plan)
        store = open_store(cfg, source, codec, progress)
        low_bit = None
        if low_codec is not None:
            low_store = open_low_bit_store(cfg, source, low_codec, progress)
            try:
                low_bit = LowBitMiss(low_store, low_codec, cfg.low_bit_threshold)
            finally:
                low_store.close()

        dense = None
        if cfg.dense_bits is not None:
            from offload.formats.dense_linears import DenseLoader

            dense = DenseLoader(cfg.dense_bits, cfg.dtype, Path(cfg.store_dir) if cfg.store == "disk" else None,
                                source.non_expert_fingerprint(), source.files, source.tensor_names())
        model = _load_model(model_dir, hf_config, arch, cfg, source, dense)
        moe_layers = []
        for name, module in model.named_modules():
            if type(module).__name__ == "Offloaded" + arch.experts_class:
                module.layer_idx = int(_LAYER.search(name).group(1))
                moe_layers.append(module.layer_idx)
        if sorted(moe_layers) != source.layers:
            raise OffloadError(f"the model has MoE layers {sorted(moe_layers)} but the checkpoint has experts for "
                               f"layers {source.layers}; the checkpoint does not match its config.json")
        capacity = plan.capacity
        device = torch.device(cfg.device)
        moe_layers = sorted(moe_layers)
        tracer = (Tracer(moe_layers, num_experts, top_k, hf_config.model_type, store.record_bytes)
                  if cfg.trace else None)
        worker = _prefetch_worker(cfg, device)
        ram = None
        if plan.ram_capacity and not plan.in_place:  # a RAM tier of its own, feeding the device slots
            n = plan.ram_capacity
            ram = RamTier(store, ExpertCache(n, make_cache_policy(cfg.policy, n, moe_layers, top_k)), host_bytes,
                          transform=_host_transform(host_codec, store) if device.type == "cpu" else None,
                          worker=worker, pinned=device.type == "cuda")
            worker = "thread"  # the device slots load from RAM on demand; the RAM tier takes the prefetches
        slots = SlotPool(capacity, slot_bytes, device, shared=worker == "process")
        cache = ExpertCache(capacity, make_cache_policy(cfg.policy, capacity, moe_layers, top_k))
        miss = None
        if ram is not None:
            shapes = matrix_shapes(source.layout, arch.transposed)
            costs = measure_costs(store, ram, codec, host_codec, device, shapes) if cfg.miss == "auto" else None
            miss = miss_policy(cfg.miss, costs, cache.stats)
        engine = Engine(store, cache, slots, num_experts, top_k, moe_layers,
                        predictor=_predictor(cfg, model, moe_layers, num_experts, top_k),
                        prefetch_width=cfg.prefetch_width, codec=codec, tracer=tracer,
                        min_precision=cfg.prefetch_min_precision, worker=worker, ram=ram, miss=miss,
                        host_codec=host_codec, tier="ram" if plan.in_place else "device", low_bit=low_bit)
        hooks = []
        if engine.entry:
            hooks = (hook_layer_entries(model, moe_layers, engine.enter)
                     + hook_attention_outputs(model, moe_layers, engine.attended))
        for module in model.modules():
            if getattr(module, "layer_idx", None) is not None and hasattr(module, "engine"):
                module.engine = engine
                if not hasattr(module, "is_transposed"):  # undecorated classes (Llama-4) carry no flags
                    module.is_transposed = arch.transposed
        loaded = cls(model, engine, cfg, arch, source, plan, _load_tokenizer(model_dir), hooks)
        if cfg.active_experts is not None:
            engine.active = ActiveExperts.for_model(cfg.active_experts, loaded, hf_config)
            loaded.plan = dataclasses.replace(plan, active_experts=engine.active.describe())
            loaded.reset_cache()  # choosing may have run the model: start cold, counters at zero
        if cfg.hot_set is not None:  # after LExI: a warm-up routes with the trimmed top-k
            loaded._pin_hot_set(cfg.hot_set)
        return loaded

    def _pin_hot_set(self, path: str) -> None:
        """Pin the most used experts of a routing trace, or of one warm-up forward over a text."""
        from offload.engine.hot_set import hot_keys, is_trace, load_trace, warmup_ids

        e = self.engine
        if is_trace(path):
            trace = load_trace(path, e.moe_layers, e.num_experts)
        else:
            ids = warmup_ids(path, self.tokenizer,
                             self.config.context or getattr(self.model.config, "max_position_embeddings", None))
            own, e.tracer = e.tracer, Tracer(e.moe_layers, e.num_experts, e.top_k)
            try:
                self(ids)
                trace = e.tracer.trace()
            finally:
                e.tracer = own
            self.reset_cache()  # the warm-up's experts are not the hot set's
        e.pin_hot(hot_keys(trace, e.cache.capacity, e.top_k))
        self.reset_stats()  # loading the hot set is placement, not the run's traffic

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
            "prefetch_suppressed": s.prefetch_suppressed, "prefetch_cancelled": s.prefetch_cancelled,
            "prefetch_precision": e.precision,
            "prefetch_wasted": (s.prefetch_issued - s.prefetch_useful - s.prefetch_cancelled
                                - e.prefetcher.pending_unused()),
            "resident_experts": len(e.cache), "resident_bytes": len(e.cache) * e.slots.record_bytes,
            "capacity_experts": e.cache.capacity, "capacity_bytes": e.slots.nbytes,
            "total_experts": len(self.source.keys()), "expert_bytes": e.slots.record_bytes,
            "store": e.store.tier,
            "tiers": e.tier_counts(), "links": e.link_stats(),
            "ram_experts": len(e.ram.cache) if e.ram is not None else 0,
            "ram_capacity_experts": e.ram.capacity if e.ram is not None else 0,
            "active_experts": None if e.active is None else dict(e.active.k),  # LExI: layer -> its top-k
            "low_bit": None if e.low_bit is None else e.low_bit.stats(),  # HOBBIT: misses served by low-bit copies
        }

    def trace(self) -> Trace:
        """The routing recorded so far (needs trace=True)."""
        if self.engine.tracer is None:
            raise OffloadError("routing is recorded only with trace=True; load the model with trace=True")
        return self.engine.tracer.trace()

    def reset_cache(self) -> None:
        """Empty the expert cache and restart its policy and predictor: the next run starts cold."""
        e = self.engine
        for key in e.hot:
            e.cache.unpin(key)
        for tier in (e, e.ram) if e.ram is not None else (e,):
            tier.prefetcher.drain()
            for key in tier.cache.keys():
                tier.cache.remove(key)
            tier.cache.policy = make_cache_policy(self.config.policy, tier.cache.capacity, e.moe_layers, e.top_k)
        e.pin_hot(e.hot)  # the static hot set outlives a reset: it is placement, not cache state
        e.reset_prediction()
        if e.low_bit is not None:
            e.low_bit.reset()
        if e.tracer is not None:
            e.tracer.reset()
        self.reset_stats()

    def reset_stats(self) -> None:
        e = self.engine
        e.stats.reset()
        e.cpu_experts = 0
        if e.low_bit is not None:
            e.low_bit.reset_stats()
        for c in (e.cache.stats, e.ram.cache.stats) if e.ram is not None else (e.cache.stats,):
            c.hits = c.misses = c.evictions = c.prefetch_inserts = 0
        if e.ram is not None:
            e.ram.stats.reset()

    def close(self) -> None:
        """Stop the prefetch worker and close the store (also done when the model is garbage-collected)."""
        self._finalizer()

    def __enter__(self) -> OffloadedModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- helpers -------------------------------------------------------------------------------------
def _shutdown(engine: Engine, hooks: list) -> None:
    for handle in hooks:
        handle.remove()
    engine.close()
    engine.store.close()


def _host_transform(codec, store):
    """Stored record -> CPU compute form, as a CPU RAM tier keeps it (None: dense records are kept as stored)."""
    if codec is None:
        return None
    return lambda key, record, slot: codec.transform(store.format_of(key), record, slot)


def make_cache_policy(name: str, capacity: int, moe_layers: list[int], top_k: int):
    """The engine's policy object, built as the simulator builds it (`cache.policy_for`)."""
    try:
        return policy_for(name, capacity, moe_layers, top_k)
    except ValueError as e:
        raise OffloadError(str(e)) from None


def _prefetch_worker(cfg: OffloadConfig, device: torch.device) -> str:
    """The loader process where it can run (a predictor prefetches, CPU slots, Linux fork), else a thread."""
    from offload.engine.loader import fork_available

    if cfg.prefetch_worker == "process" and not fork_available():
        raise OffloadError("prefetch_worker='process' needs Linux (fork); use prefetch_worker='thread'")
    if cfg.prefetch_worker != "auto":
        return cfg.prefetch_worker
    use = cfg.predictor not in (None, "none") and device.type == "cpu" and fork_available()
    return "process" if use else "thread"


def _predictor(cfg: OffloadConfig, model, moe_layers: list[int], num_experts: int, top_k: int):
    if cfg.predictor in (None, "none"):
        return None
    from predictors import find_routers, make_predictor

    width = max(top_k, min(cfg.prefetch_width or top_k, num_experts))
    return make_predictor(cfg.predictor, routers=find_routers(model), moe_layers=moe_layers,
                          num_experts=num_experts, top_k=top_k, lookahead=cfg.lookahead, width=width)


def _load_model(path: Path, hf_config, arch: Arch, cfg: OffloadConfig, source: CheckpointSource, dense=None):
    """transformers' model minus the experts; `dense` (a DenseLoader) quantizes the other linears as they load."""
    model_cls = AutoModelForCausalLM._model_mapping[type(hf_config)]
    orig = getattr(importlib.import_module(model_cls.__module__), arch.experts_class)
    register_patch_mapping({arch.experts_class: offloaded_class(orig)}, overwrite=True)
    try:
        kwargs = {"device_map": {"": cfg.device}} if cfg.device != "cpu" else {}
        with _transformers_quiet(), dense.loading() if dense is not None else contextlib.nullcontext():
            model = AutoModelForCausalLM.from_pretrained(path, config=source.format.load_config(hf_config),
                                                         dtype=cfg.dtype, **kwargs)
        source.finish_load(model)
        if dense is not None:
            dense.finish(model)
    finally:
        unregister_patch_mapping([arch.experts_class])
    return model.eval()


@contextlib.contextmanager
def _transformers_quiet():
    """Silence transformers while it loads: the dropped expert tensors are reported as "unexpected" and its
    "Loading weights" bar is noise on every start. Both switches are process-wide, so they go back as found."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    verbosity, bars, hub_bars = (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled(),
                                 not are_progress_bars_disabled())
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # also huggingface_hub's
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()  # turns huggingface_hub's on too: its own state follows
        (enable_progress_bars if hub_bars else disable_progress_bars)()


def _load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    files = [f for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model") if (path / f).exists()]
    if not files:
        return None
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - tokenizers, sentencepiece and json each raise their own types
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise OffloadError(f"cannot load the tokenizer in {path} ({', '.join(files)}): {first}; fix or re-download "
                           f"those files") from None
