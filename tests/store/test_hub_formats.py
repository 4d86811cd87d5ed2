"""Checkpoints as the hub publishes them: GPT-OSS with MXFP4 experts, DeepSeek-V3 in block FP8.

Decoders are checked against transformers' own (convert_moe_packed_tensors, Fp8Dequantize) and the blockwise
formula; offloaded generation against stock transformers on a bf16 twin holding the decoded weights."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from hub_checkpoints import deepseek_v3_fp8, fp8_encode, gpt_oss_mxfp4, packed_expert_bytes
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
from transformers.integrations.finegrained_fp8 import Fp8Dequantize
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from offload import OffloadedModel, OffloadError
from offload.store.convert import build_store
from offload.store.hub_formats import BlockFp8, Fp8Tensor, Mxfp4Experts, Stored, decode_mxfp4
from offload.formats.quant import dequantize, parse_format, quantize
from offload.store.safetensors_file import SafetensorsFile
from offload.store.source import open_checkpoint

NEW = 24
BUILDERS = {"mxfp4": gpt_oss_mxfp4, "fp8": deepseek_v3_fp8}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """format -> (packed checkpoint, bf16 twin with the decoded weights)."""
    return {fmt: make(tmp_path_factory.mktemp(fmt)) for fmt, make in BUILDERS.items()}


def tensors(path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def greedy(model, ids):
    return model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bit patterns of a float tensor: equal means identical, signed zeros and infinities included."""
    return t.contiguous().view({2: torch.int16, 4: torch.int32}[t.element_size()])


def prompt(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 90, (1, 10), generator=torch.Generator().manual_seed(seed))


# --- decoders ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_mxfp4_decoder_is_bit_identical_to_transformers(dtype):
    """Every byte and every e8m0 exponent (0..254: fp16 under- and overflows at the ends), in every dtype."""
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 40, 8, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(0, 255, (3, 40, 8), dtype=torch.uint8, generator=g)
    scales[0, 0] = torch.arange(8) * 36  # the extremes for sure
    want = convert_moe_packed_tensors(blocks, scales, dtype=dtype)
    got = decode_mxfp4(blocks, scales, dtype)
    assert got.shape == want.shape == (3, 8 * 32, 40)
    assert torch.equal(bits(got), bits(want))
    assert torch.equal(bits(decode_mxfp4(blocks[1], scales[1], dtype)), bits(want[1]))  # one expert's slice


def test_mxfp4_experts_read_one_at_a_time_as_transformers_decodes_them(hub):
    packed, twin = hub["mxfp4"]
    _cfg, _arch, src, _k = open_checkpoint(packed, torch.bfloat16)
    assert isinstance(src.format, Mxfp4Experts)
    raw, want = tensors(packed), tensors(twin)
    full = convert_moe_packed_tensors(raw["model.layers.1.mlp.experts.gate_up_proj_blocks"],
                                      raw["model.layers.1.mlp.experts.gate_up_proj_scales"])
    assert {s.name: s.shape for s in src.layout.specs} == {"gate_up": (64, 128), "down": (64, 64),
                                                          "gate_up_bias": (128,), "down_bias": (64,)}
    for e in (0, 5):
        rec = src.read((1, e))
        assert torch.equal(rec["gate_up"], full[e])
        assert torch.equal(rec["down"], want["model.layers.1.mlp.experts.down_proj"][e])
        assert torch.equal(rec["gate_up_bias"], want["model.layers.1.mlp.experts.gate_up_proj_bias"][e])


def test_fp8_decoder_matches_transformers_and_the_blockwise_formula(tmp_path):
    """Whole blocks: transformers' Fp8Dequantize. Partial edge blocks (DeepSeek-V3's 576-row kv_a_proj_with_mqa):
    the formula W[i, j] = q[i, j] * scale_inv[i // 128, j // 128], which transformers' grid-derived block misses."""
    w = torch.randn(96, 80)
    cases = {"whole": (w[:64, :64], [32, 32]), "partial": (w, [32, 32]), "576": (torch.randn(576, 256), [128, 128])}
    for name, (x, block) in cases.items():
        q, s = fp8_encode(x, block)
        save_file({"w": q, "w_scale_inv": s}, tmp_path / f"{name}.safetensors")
        f = SafetensorsFile(tmp_path / f"{name}.safetensors")
        got = Fp8Tensor(Stored(f, "w"), Stored(f, "w_scale_inv"), tuple(block)).read(None, torch.bfloat16)
        i, j = torch.arange(x.shape[0])[:, None] // block[0], torch.arange(x.shape[1])[None, :] // block[1]
        assert torch.equal(got, (q.float() * s[i, j]).bfloat16()), name
        if name == "whole":
            assert torch.equal(got, Fp8Dequantize(None)._dequantize_one(q, s, torch.bfloat16))
        assert float((got.float() - x).norm() / x.norm()) < 0.05, name  # e4m3: ~3 significant bits


def test_fp8_experts_and_shapes(hub):
    packed, twin = hub["fp8"]
    _cfg, _arch, src, _k = open_checkpoint(packed, torch.bfloat16)
    assert isinstance(src.format, BlockFp8) and src.format.block == (32, 32)
    assert src.layers == [1, 2, 3], "the MTP layer (4) is not one of the model's"
    want = tensors(twin)
    for layer, e in ((1, 0), (3, 7)):
        rec = src.read((layer, e))
        p = f"model.layers.{layer}.mlp.experts.{e}."
        assert torch.equal(rec["gate_up"], torch.cat([want[p + "gate_proj.weight"], want[p + "up_proj.weight"]]))
        assert torch.equal(rec["down"], want[p + "down_proj.weight"])


# --- loading and generating -------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", list(BUILDERS))
@pytest.mark.parametrize("store", ["ram", "disk"])
def test_greedy_identical_to_transformers_on_the_decoded_twin(hub, fmt, store, tmp_path):
    """A cache of top_k slots (less than one layer's experts): every token misses and decodes experts."""
    packed, twin = hub[fmt]
    ids = prompt()
    ref = AutoModelForCausalLM.from_pretrained(twin, dtype=torch.bfloat16, experts_implementation="eager").eval()
    want = greedy(ref, ids)
    with OffloadedModel.from_pretrained(packed, cache_experts=2, store=store,
                                        store_dir=tmp_path / "s" if store == "disk" else None) as m:
        assert m.engine.top_k == 2 and m.source.num_experts == 8
        assert torch.equal(greedy(m, ids), want), f"{fmt} {store}: tokens differ from transformers on the twin"
        s = m.stats()
        assert s["misses"] > 2 * len(m.engine.moe_layers) and s["resident_experts"] <= 2
        # transformers' weights, the FP8 projections decoded at load included
        params = dict(m.model.named_parameters())
        for name, t in dict(ref.named_parameters()).items():
            if ".experts." not in name:
                assert torch.equal(params[name], t), name


def test_plan_counts_the_checkpoint_bytes(hub):
    """The RAM tier's store is the checkpoint: its experts' packed bytes. Non-expert weights at the model dtype,
    scales folded into their tensors, DeepSeek's MTP layer left out (transformers does not load it)."""
    for fmt, (packed, twin) in hub.items():
        with OffloadedModel.from_pretrained(packed, cache_experts=2) as m:
            plan = m.plan
            non_expert = sum(t.numel() * 2 for n, t in tensors(twin).items() if ".experts." not in n)
            assert plan.non_expert_bytes == non_expert, fmt
            assert plan.store_bytes == packed_expert_bytes(packed) == m.source.expert_disk_bytes(), fmt
            assert plan.store_bytes < 0.6 * plan.total_experts * plan.expert_bytes, fmt  # packed: 4.25 or ~8 bits
            greedy(m, prompt())
            s = m.stats()
            assert s["bytes_loaded"]["ram"] == s["misses"] * plan.store_bytes // plan.total_experts, fmt


@pytest.mark.parametrize("fmt, bits, bound", [("mxfp4", "int4-g32", 0.1), ("fp8", "int8", 0.02)])
def test_requantizing_packed_experts(hub, fmt, bits, bound, tmp_path):
    """offload-convert reads the packed experts one at a time and requantizes them; the store is what a model
    with those bits loads, and its weights stay within the format's error of the decoded ones (the tiny DeepSeek's
    48-wide experts take no int4 group, hence int8)."""
    packed, _twin = hub[fmt]
    summary = build_store(packed, tmp_path / "s", bits=bits, progress=False)
    assert "24 experts" in summary
    with OffloadedModel.from_pretrained(packed, store="disk", store_dir=tmp_path / "s", bits=bits,
                                        cache_experts=2) as m:
        assert m.stats()["expert_bytes"] < m.source.layout.nbytes * 0.6
        out = greedy(m, prompt())
        assert out.shape[1] == 10 + NEW
    _cfg, arch, src, _k = open_checkpoint(packed, torch.bfloat16)
    q = parse_format(bits)
    errors = []
    for key in src.keys():
        record = src.read(key)
        for name in ("gate_up", "down"):
            w = (record[name].T if arch.transposed else record[name]).float()  # [out, in], as quantize takes it
            back = dequantize(quantize(w, q), q, w.shape)
            errors.append(float((back - w).norm() / w.norm()))
    print(f"{fmt} -> {bits}: relative weight error mean {sum(errors) / len(errors):.4f}, max {max(errors):.4f}")
    assert max(errors) < bound, f"{fmt} -> {bits}: requantization error up to {max(errors):.3f}"


# --- what is refused ---------------------------------------------------------------------------------
def _edit_config(src, dst, **changes):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("fmt", ["mxfp4", "fp8"])
def test_dense_bits_on_a_packed_checkpoint_is_refused_before_anything_is_converted(hub, fmt, tmp_path):
    with pytest.raises(OffloadError, match=r"dense_bits with a packed .* not supported yet; drop dense_bits"):
        OffloadedModel.from_pretrained(hub[fmt][0], store="disk", store_dir=tmp_path / "s", dense_bits=8)
    assert not (tmp_path / "s").exists()


def test_unknown_or_missing_quantization_is_refused_with_the_fix(hub, tmp_path):
    packed, _ = hub["mxfp4"]
    awq = _edit_config(packed, tmp_path / "awq", quantization_config={"quant_method": "awq", "bits": 4})
    with pytest.raises(OffloadError, match="quantized with 'awq'.*use the bf16 checkpoint"):
        OffloadedModel.from_pretrained(awq)
    bare = _edit_config(packed, tmp_path / "bare", quantization_config=None)
    with pytest.raises(OffloadError, match="no quantization_config.*restore the checkpoint's original config.json"):
        OffloadedModel.from_pretrained(bare)
    fp8, _ = hub["fp8"]
    wrong = _edit_config(fp8, tmp_path / "block", quantization_config={"quant_method": "fp8",
                                                                       "weight_block_size": [16, 16]})
    with pytest.raises(OffloadError, match="weight_block_size does not match"):
        OffloadedModel.from_pretrained(wrong)


# --- memory -------------------------------------------------------------------------------------------
PROBE = """
import json, sys
import offload, transformers
from offload import OffloadedModel
from offload.store.convert import build_store

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

open("/proc/self/clear_refs", "w").write("5")
before = hwm()
if sys.argv[2] == "load":
    m = OffloadedModel.from_pretrained(sys.argv[1], cache_experts=2)
    m.generate(__import__("torch").tensor([[5, 6, 7]]), max_new_tokens=2)
    size = m.stats()["total_experts"] * m.stats()["expert_bytes"]
else:
    build_store(sys.argv[1], sys.argv[3], progress=False)
    size = None
print(json.dumps({"growth": hwm() - before, "dense_expert_bytes": size}))
"""


def probe(*args) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_loading_and_converting_packed_experts_peak_rss_is_a_few_experts(tmp_path):
    """MXFP4 GPT-OSS, 4x the experts: loading (and decoding on misses) and converting grow peak RSS by about as
    much as the small model's, never by the experts' bytes."""
    big = dict(hidden_size=512, vocab_size=512, num_hidden_layers=4, head_dim=64,
               layer_types=["sliding_attention", "full_attention"] * 2)
    small, _ = gpt_oss_mxfp4(tmp_path / "small", **big, intermediate_size=512)
    large, _ = gpt_oss_mxfp4(tmp_path / "large", **big, intermediate_size=2048)
    a, b = probe(small, "load"), probe(large, "load")
    one_expert = b["dense_expert_bytes"] // 32
    extra = b["growth"] - a["growth"]
    assert extra < 6 * one_expert, f"4x the experts grew loading's peak RSS by {extra / 2**20:.0f} MiB more"
    c = probe(large, "convert", tmp_path / "store")
    assert c["growth"] < a["growth"] + 8 * one_expert, f"converting grew peak RSS by {c['growth'] / 2**20:.0f} MiB"
