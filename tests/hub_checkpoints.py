"""Tiny checkpoints in the exact on-disk layouts the hub publishes, plus a bf16 twin holding their decoded weights.

GPT-OSS ships its experts in MXFP4: `...experts.gate_up_proj_blocks` uint8 [E, 2I, H/32, 16] (two e2m1 codes
per byte, the low nibble first) and `..._scales` uint8 [E, 2I, H/32] (e8m0 exponents, bias 127), the same for
`down_proj`; biases and everything else stay bf16. DeepSeek-V3/R1 ship every projection (attention, dense MLPs,
shared and routed experts) as float8_e4m3fn `X.weight` with float32 `X.weight_scale_inv`, one scale per block of
`weight_block_size` (ceil-divided: partial blocks at the edges), plus an extra MTP layer transformers ignores.
The encoders are the tests' own; the twins are decoded with transformers' own MXFP4 decoder and with the
blockwise FP8 formula, so stock transformers on the twin is the reference for offloaded generation.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers.integrations.mxfp4 import FP4_VALUES, convert_moe_packed_tensors

from tiny_models import build

E4M3_MAX = 448.0
GPT_OSS = dict(intermediate_size=64)  # MXFP4 packs 32 inputs per scale: down_proj's input must be a multiple of 32
DEEPSEEK_BLOCK = [32, 32]             # partial blocks everywhere (64 = 2 x 32, 48 = 32 + 16, 24 < 32)


def mxfp4_encode(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., out, in] -> (blocks uint8 [..., out, in/32, 16], scales uint8 [..., out, in/32]): per group of 32
    inputs the smallest power of two that brings the group into e2m1's range, each value rounded to nearest."""
    groups = w.reshape(-1, 32)
    blocks = torch.empty(groups.shape[0], 16, dtype=torch.uint8)
    scales = torch.empty(groups.shape[0], dtype=torch.uint8)
    mags = torch.tensor(FP4_VALUES[:8])
    for i in range(0, groups.shape[0], 1 << 16):  # chunks: the nearest-value search takes 32 x 8 floats a group
        g = groups[i:i + (1 << 16)].float()
        exp = torch.ceil(torch.log2(g.abs().amax(-1).clamp_min(2.0**-126) / 6.0)).clamp(-127, 127)
        scaled = g / torch.exp2(exp)[:, None]
        codes = (scaled.abs()[..., None] - mags).abs().argmin(-1) | (scaled < 0).to(torch.long) << 3
        codes = codes.to(torch.uint8).view(-1, 16, 2)
        blocks[i:i + (1 << 16)] = codes[..., 0] | codes[..., 1] << 4
        scales[i:i + (1 << 16)] = (exp + 127).to(torch.uint8)
    lead = (*w.shape[:-1], w.shape[-1] // 32)
    return blocks.view(*lead, 16), scales.view(lead)


def fp8_encode(w: torch.Tensor, block: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] -> (float8_e4m3fn [out, in], float32 scale_inv [ceil(out/bm), ceil(in/bn)]), DeepSeek's scheme."""
    bm, bn = block
    rows, cols = w.shape
    pr, pc = -rows % bm, -cols % bn
    padded = torch.nn.functional.pad(w.float(), (0, pc, 0, pr))
    blocks = padded.reshape(padded.shape[0] // bm, bm, padded.shape[1] // bn, bn)
    scale = (blocks.abs().amax(dim=(1, 3)) / E4M3_MAX).clamp_min(1e-12)
    q = (blocks / scale[:, None, :, None]).reshape(padded.shape)[:rows, :cols]
    return q.to(torch.float8_e4m3fn), scale


def fp8_decode(q: torch.Tensor, scale: torch.Tensor, block: list[int], dtype: torch.dtype) -> torch.Tensor:
    """The blockwise formula, element by element: W[i, j] = q[i, j] * scale_inv[i // bm, j // bn]."""
    i = torch.arange(q.shape[0])[:, None] // block[0]
    j = torch.arange(q.shape[1])[None, :] // block[1]
    return (q.float() * scale[i, j]).to(dtype)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _save_sharded(path: Path, tensors: dict[str, torch.Tensor], split: set[str]) -> None:
    """Two shards as the hub does (with model.safetensors.index.json); names in `split` go to the second."""
    for f in path.glob("*.safetensors*"):
        f.unlink()
    shards = {"model-00001-of-00002.safetensors": {k: v for k, v in tensors.items() if k not in split},
              "model-00002-of-00002.safetensors": {k: v for k, v in tensors.items() if k in split}}
    weight_map = {}
    for fname, part in shards.items():
        save_file({k: v.contiguous() for k, v in part.items()}, path / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": size},
                                                                    "weight_map": weight_map}))


def _twin(src: Path, out: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """A plain bf16 checkpoint: `src`'s config and tokenizer, `tensors` as its weights."""
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("*.safetensors*"))
    save_file({k: v.contiguous() for k, v in tensors.items()}, out / "model.safetensors", metadata={"format": "pt"})
    return out


def _set_quantization(path: Path, quantization: dict) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = quantization
    (path / "config.json").write_text(json.dumps(cfg, indent=2))


def gpt_oss_mxfp4(out: Path, seed: int = 0, **overrides) -> tuple[Path, Path]:
    """(MXFP4 checkpoint, bf16 twin holding its decoded experts) of a tiny GPT-OSS."""
    packed = build("gpt_oss", out / "mxfp4", dtype=torch.bfloat16, seed=seed, **{**GPT_OSS, **overrides})
    dense = _tensors(packed)
    hub, twin = {}, {}
    for name, t in dense.items():
        m = re.search(r"\.experts\.(gate_up_proj|down_proj)$", name)
        if m is None:
            hub[name] = twin[name] = t
            continue
        blocks, scales = mxfp4_encode(t.transpose(1, 2))  # in memory [E, in, out]; on the hub [E, out, in/32, 16]
        hub[name + "_blocks"], hub[name + "_scales"] = blocks, scales
        twin[name] = convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)
    twin_dir = _twin(packed, out / "twin", twin)
    _save_sharded(packed, hub, {k for k in hub if "down_proj" in k})
    _set_quantization(packed, {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]})
    return packed, twin_dir


def _fp8_packed(name: str) -> bool:
    """DeepSeek-V3 stores every projection in FP8; the router, embeddings, norms and lm_head stay as they are."""
    return re.search(r"layers\.\d+\..*_proj(_with_mqa)?\.weight$", name) is not None


def deepseek_v3_fp8(out: Path, seed: int = 0, block: list[int] = DEEPSEEK_BLOCK, **overrides) -> tuple[Path, Path]:
    """(block-FP8 checkpoint with an MTP layer, bf16 twin holding its decoded weights) of a tiny DeepSeek-V3."""
    packed = build("deepseek_v3", out / "fp8", dtype=torch.bfloat16, seed=seed, **overrides)
    dense = _tensors(packed)
    layers = json.loads((packed / "config.json").read_text())["num_hidden_layers"]
    hub, twin = {}, {}
    for name, t in dense.items():
        if not _fp8_packed(name):
            hub[name] = twin[name] = t
            continue
        q, scale = fp8_encode(t, block)
        hub[name], hub[name.removesuffix("weight") + "weight_scale_inv"] = q, scale
        twin[name] = fp8_decode(q, scale, block, torch.bfloat16)
    last = f"model.layers.{layers - 1}."
    mtp = {k.replace(last, f"model.layers.{layers}."): v.clone() for k, v in hub.items() if k.startswith(last)}
    twin_dir = _twin(packed, out / "twin", twin)
    # scales of the routed experts in the other shard than their weights: a reader must pair across files
    _save_sharded(packed, {**hub, **mtp}, {k for k in hub if ".experts." in k and k.endswith("scale_inv")})
    _set_quantization(packed, {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                               "weight_block_size": block})
    return packed, twin_dir


def packed_expert_bytes(path: Path) -> int:
    """Bytes the routed experts of the decoder layers take in the checkpoint's files."""
    cfg = json.loads((path / "config.json").read_text())
    layers = cfg["num_hidden_layers"]
    total = 0
    for name, t in _tensors(path).items():
        m = re.search(r"layers\.(\d+)\.mlp\.experts\.", name)
        if m and int(m.group(1)) < layers:
            total += t.numel() * t.element_size()
    return total

