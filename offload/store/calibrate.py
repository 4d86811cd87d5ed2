"""Calibration-aware conversion: run the model over a text, collect each expert matrix's input Hessian, and
quantize with GPTQ (offload/formats/gptq.py) instead of from the weights alone.

The pass loads the checkpoint as the engine runs it dense (store="ram", experts in the model dtype) and
hooks every MoE layer's experts module: for each expert, the tokens routed to it go through transformers'
own expert math once more (`expert_ffn`) with a linear that records its input, so gate_up sees the hidden
states and down the expert's own activations, whatever the architecture's gate. H = 2 X^T X / n is kept in
fp32 per expert matrix ([K, K] each, nothing per token). The statistics are cached in the store directory
(`calibration.pt`, written atomically, tied to the text's hash and the checkpoint's fingerprint): a resumed
conversion reuses them, so its records are the same bytes. Experts routed fewer than `MIN_TOKENS` tokens
keep the weight-only path; index.json lists them.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from offload.errors import OffloadError
from offload.formats.gptq import gptq, supports
from offload.formats.quant import quantize
from offload.formats.record import MATRICES, RecordCodec
from offload.progress import progress_bar
from offload.store.source import CheckpointSource

MIN_TOKENS = 16   # fewer routed tokens than this: H is too poorly estimated to trust over the weights
WINDOW = 512      # tokens per forward of the calibration pass (at most the model's context)
CACHE = "calibration.pt"
Stats = dict[tuple[int, int], dict]


def text_sha256(path: str | Path) -> str:
    """The calibration file's hash, which ties a store to the text it was calibrated on."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError as e:
        raise OffloadError(f"cannot read the calibration file {path} ({e.strerror}); pass an existing text file "
                           f"(--calibration FILE)") from None


def settings_of(path: str | Path) -> dict:
    """What a calibrated store's settings record about its calibration."""
    return {"method": "gptq", "sha256": text_sha256(path), "min_tokens": MIN_TOKENS}


class CalibratedCodec(RecordCodec):
    """A RecordCodec whose encoder runs GPTQ on the matrices it has statistics for."""

    def __init__(self, codec: RecordCodec, stats: Stats, min_tokens: int = MIN_TOKENS, support: str = "joint") -> None:
        super().__init__(codec.dense, codec.rule, codec.transposed, codec.device)
        self.stats, self.min_tokens, self.support = stats, min_tokens, support  # support: gptq.SUPPORTS

    def calibrated(self, key: tuple[int, int]) -> bool:
        s = self.stats.get(tuple(key))
        return s is not None and s["tokens"] >= self.min_tokens

    def meta(self, keys: list) -> dict:
        tokens = [self.stats[k]["tokens"] if k in self.stats else 0 for k in keys]
        return {"calibration": {"tokens_per_expert_min": min(tokens), "tokens_per_expert_max": max(tokens),
                                "weight_only": [list(k) for k in keys if not self.calibrated(k)]}}

    def quantize_matrix(self, key, matrix, w, fmt):
        parts = gptq(w, self.stats[key][matrix], fmt, support=self.support) if self.calibrated(key) and supports(fmt) else None
        return parts or quantize(w, fmt)  # too few tokens, or no Cholesky factor: weights alone


def calibrated_codec(codec: RecordCodec, source: CheckpointSource, text: str | Path, store_dir: Path,
                     dtype: torch.dtype, progress: bool = True) -> CalibratedCodec:
    """`codec` with GPTQ from the statistics of `text`: read from the store's cache, else collected and cached."""
    store_dir = Path(store_dir)
    tag = {"sha256": text_sha256(text), "fingerprint": source.fingerprint(), "dtype": str(dtype)}
    cache = store_dir / CACHE
    if cache.exists():
        saved = torch.load(cache, weights_only=True)
        if saved.get("tag") == tag:
            return CalibratedCodec(codec, {tuple(int(i) for i in k.split(".")): v for k, v in saved["stats"].items()})
    stats = collect(source, Path(text), dtype, progress)
    store_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(CACHE + ".tmp")
    torch.save({"tag": tag, "stats": {f"{k[0]}.{k[1]}": v for k, v in stats.items()}}, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, cache)
    return CalibratedCodec(codec, stats)


def collect(source: CheckpointSource, text: Path, dtype: torch.dtype, progress: bool = True) -> Stats:
    """{(layer, expert): {"gate_up": H, "down": H, "tokens": n}} over `text`, H = 2 X^T X / n in fp32."""
    from offload.engine.experts import expert_ffn
    from offload.model import OffloadedModel

    model = OffloadedModel.from_pretrained(source.model_dir, store="ram", dtype=dtype)
    if model.tokenizer is None:
        raise OffloadError(f"calibration needs the checkpoint's tokenizer, and {source.model_dir} has none; add "
                           f"tokenizer.json (or convert without --calibration)")
    ids = model.tokenizer(text.read_text(encoding="utf-8"), return_tensors="pt", verbose=False).input_ids[0]
    if len(ids) == 0:
        raise OffloadError(f"the calibration file {text} is empty; give it a few thousand tokens of text")
    sums: Stats = {}
    transposed = model.arch.transposed

    def record(layer: int, expert: int):
        def linear(x: torch.Tensor, w: dict, name: str) -> torch.Tensor:
            s = sums.setdefault((layer, expert), {"tokens": 0})
            x32 = x.float()
            if name in s:
                s[name].addmm_(x32.T, x32)
            else:
                s[name] = x32.T @ x32
            if name == "gate_up":
                s["tokens"] += len(x)
            elif name == "down":  # its output is discarded (the engine computes the layer): skip the matmul
                return x.new_zeros(len(x), w[name].shape[1 if transposed else 0])
            return x @ w[name] if transposed else F.linear(x, w[name])
        return linear

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        top_k_index = args[1] if len(args) > 1 else kwargs.get("top_k_index")
        layer = module.layer_idx
        for e, x in _routed(hidden, top_k_index, source.num_experts):
            expert_ffn(module, source.read((layer, e)), x, record(layer, e))

    modules = [m for m in model.model.modules() if getattr(m, "layer_idx", None) is not None and hasattr(m, "engine")]
    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in modules]
    window = min(WINDOW, int(getattr(model.model.config.get_text_config(), "max_position_embeddings", WINDOW)))
    try:
        with progress_bar("calibrating", len(ids), progress, unit="tokens") as bar:
            for i in range(0, len(ids), window):
                model(ids[None, i:i + window])
                bar(len(ids[i:i + window]))
    finally:
        for h in handles:
            h.remove()
        model.close()
    return {k: {"tokens": s["tokens"], **{m: s[m] * (2 / s["tokens"]) for m in MATRICES}} for k, s in sums.items()}


def _routed(hidden: torch.Tensor, top_k_index: torch.Tensor | None, E: int):
    """(expert, its tokens [t, H]) for every expert a MoE layer call routes tokens to, in ascending order."""
    if top_k_index is None:  # Llama-4: every expert gets every token, zeroed where it is not chosen
        x = hidden.view(E, -1, hidden.shape[-1])
        for e in range(E):
            rows = x[e][x[e].abs().amax(-1) > 0]
            if len(rows):
                yield e, rows
        return
    for e in top_k_index.unique().tolist():
        if 0 <= e < E:
            yield e, hidden[(top_k_index == e).any(-1)]
