"""dense_bits: non-expert linears quantized while loading, cached next to the store, offloading still lossless."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import ARCHS
from torch import nn
from transformers import AutoModelForCausalLM

import offload.formats.dense_linears as dense
from offload import OffloadedModel
from offload.config import OffloadConfig
from offload.errors import OffloadError
from offload.formats.quant import QFormat, quantize
from tiny_models import build

NEW = 24
MIB = 2**20


def reference(path, bits: int):
    """Stock transformers (eager experts), its linears quantized afterwards by the same quantizer."""
    kw = {} if "llama4" in str(path) else {"experts_implementation": "eager"}
    return dense.quantize_linears(AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, **kw).eval(), bits)


def prompt(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 90, (1, 10), generator=torch.Generator().manual_seed(seed))


def greedy(model, ids):
    return model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)


@pytest.mark.parametrize("value", [3, 16, True, "4"])
def test_bad_dense_bits_names_the_fix(value):
    with pytest.raises(OffloadError, match=r"dense_bits must be 8 or 4 \(or None\)"):
        OffloadConfig(dense_bits=value)


def test_formats_follow_the_kernels():
    assert dense.dense_format(4, (32000, 1024)) == QFormat("int4", 128)
    assert dense.dense_format(4, (64, 96)) == QFormat("int4", 32)      # the largest group dividing in_features
    assert dense.dense_format(4, (24, 64)) == QFormat("int8")          # out_features not a multiple of 16
    assert dense.dense_format(4, (96, 16)) == QFormat("int8")          # no group divides in_features
    assert dense.dense_format(8, (32000, 1024)) == QFormat("int8")


@pytest.mark.parametrize("bits", [8, 4])
def test_blockwise_quantization_equals_whole_matrix(bits, monkeypatch):
    monkeypatch.setattr(dense, "BLOCK_ELEMENTS", 64 * 128)  # 64-row blocks of a 320-row matrix
    w = torch.randn(320, 128, generator=torch.Generator().manual_seed(1)).bfloat16()
    layer = nn.Linear(128, 320, bias=True).bfloat16()
    layer.weight.data.copy_(w)
    q = dense.QuantizedLinear.from_linear(layer, bits)
    assert len(dense.row_blocks(w.shape)) == 5
    monkeypatch.setattr(dense, "BLOCK_ELEMENTS", 1 << 22)
    whole = dense.QuantizedLinear.from_linear(layer, bits)
    assert len(dense.row_blocks(w.shape)) == 1
    for name in whole.resident:
        assert torch.equal(q.resident[name], whole.resident[name]), name
    x = torch.randn(3, 128).bfloat16()
    deq = (x.float() @ _dequantized(w, bits).T + layer.bias.float()).bfloat16()
    assert torch.allclose(q(x).float(), deq.float(), atol=0.05, rtol=0.02)


def _dequantized(w, bits):
    from offload.formats.quant import dequantize

    fmt = dense.dense_format(bits, w.shape)
    return dequantize(quantize(w, fmt), fmt, w.shape)


@pytest.mark.parametrize("arch", ARCHS)
def test_offloaded_generation_matches_the_quantized_reference(arch, tiny_dir):
    """Small cache vs all resident vs stock transformers + quantize_linears: the same tokens; routers and
    embeddings untouched, every other nn.Linear quantized."""
    path = tiny_dir(arch)
    ids = prompt()
    ref = reference(path, 4)
    want = greedy(ref, ids)
    stock = dict(ref.named_parameters())
    probe = OffloadedModel.from_pretrained(path, dense_bits=4)
    total, k = probe.stats()["total_experts"], probe.engine.top_k
    assert torch.equal(greedy(probe, ids), want), f"{arch}: all resident differs from the quantized reference"
    kept = 0
    for prefix, parent in probe.model.named_modules():
        for name, child in parent.named_children():
            assert not dense.eligible(parent, name, child), f"{arch}: {name} left unquantized"
            if isinstance(child, nn.Embedding) or dense.is_router(parent, name):
                for pname, p in child.named_parameters():  # their own dtype (DeepSeek's routers are fp32)
                    assert torch.equal(p, stock[f"{prefix}.{name}.{pname}".lstrip(".")]), f"{arch}: {name}"
                    kept += 1
    assert kept > 1
    assert sum(isinstance(m, dense.QuantizedLinear) for m in probe.model.modules()) > 0
    probe.close()
    with OffloadedModel.from_pretrained(path, dense_bits=4, cache_experts=max(k, total // 4)) as m:
        assert torch.equal(greedy(m, ids), want), f"{arch}: small cache differs from the quantized reference"
        assert m.stats()["misses"] > 0


def test_int8_and_disk_store_are_lossless_too(tiny_dir, tmp_path):
    path = tiny_dir("qwen2_moe")
    ids = prompt(2)
    want = greedy(reference(path, 8), ids)
    for cap in (2, 24):
        with OffloadedModel.from_pretrained(path, dense_bits=8, cache_experts=cap, store="disk",
                                            store_dir=tmp_path / "store") as m:
            assert torch.equal(greedy(m, ids), want), f"capacity {cap}"


def test_second_load_reads_the_cache_and_quantizes_nothing(tiny_dir, tmp_path, monkeypatch):
    path = tiny_dir("mixtral")
    store = tmp_path / "store"
    ids = prompt(3)
    with OffloadedModel.from_pretrained(path, dense_bits=4, store="disk", store_dir=store, cache_experts=4) as m:
        first = m(ids).logits
    meta = json.loads((store / "dense-int4.json").read_text())
    assert meta["settings"] == {"dense_bits": 4, "dtype": "bfloat16"} and meta["fingerprint"]
    assert (store / "dense-int4.safetensors").stat().st_size == meta["size"]
    assert not list(store.glob("*.partial")) and not list(store.glob("*.tmp"))

    def refuse(*args):
        raise AssertionError("quantized again")

    monkeypatch.setattr(dense, "quantize_weight", refuse)
    with OffloadedModel.from_pretrained(path, dense_bits=4, store="disk", store_dir=store, cache_experts=4) as m:
        assert torch.equal(m(ids).logits, first)
    with pytest.raises(AssertionError, match="quantized again"):  # another width is another cache
        OffloadedModel.from_pretrained(path, dense_bits=8, store="disk", store_dir=store, cache_experts=4)


def test_tied_lm_head_is_quantized_from_the_embedding(tmp_path, monkeypatch):
    path = build("qwen3_moe", tmp_path / "tied", dtype=torch.bfloat16, tie_word_embeddings=True)
    ids = prompt(4)
    want = greedy(reference(path, 4), ids)
    for _ in range(2):  # built, then from the cache
        with OffloadedModel.from_pretrained(path, dense_bits=4, store="disk", store_dir=tmp_path / "s",
                                            cache_experts=4) as m:
            assert isinstance(m.model.lm_head, dense.QuantizedLinear)
            assert m.model.get_input_embeddings().weight.dtype == torch.bfloat16
            assert torch.equal(greedy(m, ids), want)


@pytest.mark.parametrize("tied", [False, True])
def test_plan_counts_non_expert_bytes_at_the_width(tied, tmp_path):
    path = build("qwen2_moe", tmp_path / "m", dtype=torch.bfloat16, tie_word_embeddings=tied)
    plain = OffloadedModel.from_pretrained(path, cache_experts=4)
    for bits in (8, 4):
        with OffloadedModel.from_pretrained(path, dense_bits=bits, cache_experts=4) as m:
            params = {t.data_ptr(): t.numel() * t.element_size() for t in m.model.parameters()}
            resident = sum(t.numel() * t.element_size() for q in m.model.modules()
                           if isinstance(q, dense.QuantizedLinear) for t in q.resident.values())
            assert m.plan.non_expert_bytes == sum(params.values()) + resident
            assert m.plan.non_expert_bytes < plain.plan.non_expert_bytes or tied
            assert f"int{bits}" in dict(m.plan.rows())["non-expert weights"]
    plain.close()


def test_projection_counts_dense_bits():
    from offload.bench import costmodel as cm

    shape = cm.ModelShape("m", 8, 8, 8, 2, 1024, 3584, 100e6, vocab=32000)
    bf16, int4 = cm.non_expert_bytes(shape, 4), cm.non_expert_bytes(shape, 4, dense_bits=4)
    embed = 32000 * 1024
    assert bf16 == 200e6 and int4 == pytest.approx(embed * 2 + (100e6 - embed) * 4.125 / 8)
    assert cm.fit(shape, cm.machine("rtx4090"), 4, dense_bits=4).non_expert_bytes == int4


PROBE = """
import json, sys, torch
import offload, transformers
from offload import OffloadedModel

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

from offload.formats import compiled
compiled.builds()  # inductor's own memory (a fixed cost of the compiled quantizer) is not the model's
open("/proc/self/clear_refs", "w").write("5")
before = status("VmHWM:")
bits = None if sys.argv[2] == "none" else int(sys.argv[2])
opts = dict(store="disk", store_dir=sys.argv[3]) if len(sys.argv) > 3 else {}
m = OffloadedModel.from_pretrained(sys.argv[1], cache_experts=2, dense_bits=bits, **opts)
m(torch.arange(3, 11)[None])  # transformers maps the checkpoint lazily: a forward touches every weight
print(json.dumps({"peak": status("VmHWM:") - before, "after": status("VmRSS:") - before}))
"""


def probe(*args) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_quantizing_while_loading_never_holds_a_second_full_precision_copy(tmp_path):
    """A 32768 x 1024 lm_head (64 MiB bf16, 17 MiB int4) plus 10 MiB of attention: loading with dense_bits=4
    peaks at most a fraction of those bytes above a plain load (a second bf16 copy would add all of them),
    stays below it afterwards, and a load from the cache peaks below the plain one."""
    path = build("mixtral", tmp_path / "m", dtype=torch.bfloat16, hidden_size=1024, intermediate_size=256,
                 vocab_size=32768, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2)
    linears, quantized = 74 * MIB, 20 * MIB
    plain = probe(path, "none")
    built = probe(path, 4, tmp_path / "store")
    cached = probe(path, 4, tmp_path / "store")
    assert built["peak"] < plain["peak"] + quantized + linears / 2, (plain, built)
    assert built["after"] < plain["after"] - 0.4 * (linears - quantized), (plain, built)
    assert cached["peak"] < plain["peak"] - 0.4 * (linears - quantized), (plain, cached)
