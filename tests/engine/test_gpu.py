"""CUDA: the same engine with slots on the GPU, a pinned staging ring and a copy stream (skips without CUDA)."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from offload import OffloadedModel

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "gpt_oss"])
@pytest.mark.parametrize("predictor", [None, "gate"])
@pytest.mark.parametrize("capacity", [10, 3])  # 3: slots are refilled while the GPU may still read them
def test_cuda_generation_identical_to_transformers(arch, predictor, capacity, tiny_dir, tmp_path):
    path = tiny_dir(arch)
    ids = torch.randint(3, 90, (1, 10), generator=torch.Generator().manual_seed(0))
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, experts_implementation="eager",
                                               device_map={"": "cuda"})
    want = ref.generate(ids.cuda(), max_new_tokens=32, min_new_tokens=32, do_sample=False).cpu()
    for store in ("ram", "disk"):
        m = OffloadedModel.from_pretrained(path, device="cuda", cache_experts=capacity, predictor=predictor, store=store,
                                           store_dir=tmp_path / "s")
        got = m.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False).cpu()
        assert torch.equal(got, want)
        assert m.engine.slots.buf.is_cuda
        m.close()


def test_cuda_quantized_store_is_lossless_under_offloading(tiny_dir, tmp_path):
    path = tiny_dir("mixtral")
    ids = torch.randint(3, 90, (1, 10), generator=torch.Generator().manual_seed(1))
    full = OffloadedModel.from_pretrained(path, device="cuda", bits="int4-g32", store="disk", store_dir=tmp_path / "s")
    small = OffloadedModel.from_pretrained(path, device="cuda", bits="int4-g32", store="disk",
                                           store_dir=tmp_path / "s", cache_experts=10, predictor="gate")
    kw = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False)
    assert torch.equal(full.generate(ids, **kw).cpu(), small.generate(ids, **kw).cpu())


@pytest.mark.parametrize("miss", ["copy", "cpu", "auto"])
@pytest.mark.parametrize("ram", ["100%", "50%"])
def test_cuda_ram_tier_each_miss_mode_matches_transformers(miss, ram, tiny_dir, tmp_path):
    """Pinned RAM tier, device misses copied on the copy stream or computed on the CPU while the GPU runs the
    resident experts: fp32 so that CPU and GPU kernels agree to the token; every use served exactly once."""
    path = tiny_dir("mixtral", torch.float32)
    ids = torch.randint(3, 90, (1, 10), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, experts_implementation="eager",
                                               device_map={"": "cuda"})
    want = ref.generate(ids.cuda(), **kw).cpu()
    m = OffloadedModel.from_pretrained(path, device="cuda", dtype="float32", store_dir=tmp_path / "s",
                                       cache_experts=3, ram_memory=ram, miss=miss)
    got = m.generate(ids, **kw).cpu()
    assert torch.equal(got, want)
    assert m.engine.ram.slots.buf.is_pinned() and m.engine.slots.buf.is_cuda
    s = m.stats()
    t = s["tiers"]
    layers, k = len(m.engine.moe_layers), m.engine.top_k
    assert t["device_hits"] + t["ram_hits"] + t["disk_reads"] == (got.shape[1] - 1) * layers * k
    if miss == "copy":
        assert t["cpu_experts"] == 0 and s["links"]["ram->device"]["loads"] == s["misses"]
    if miss == "cpu":
        assert t["device_hits"] == 0 and s["links"]["ram->device"]["loads"] == 0
    assert "RAM" in dict(m.plan.rows())["tiers"]
    m.close()


def test_cuda_ram_tier_defaults_to_auto_placement(tiny_dir, tmp_path):
    """Next to a GPU a disk store gets a RAM tier sized from free RAM, and the plan names all three tiers."""
    path = tiny_dir("mixtral")
    m = OffloadedModel.from_pretrained(path, device="cuda", store_dir=tmp_path / "s", cache_experts=3)
    assert m.plan.ram_capacity == m.plan.total_experts and m.engine.ram is not None
    tiers = dict(m.plan.rows())["tiers"]
    assert tiers.startswith("device 3 slots | RAM 24 records") and "disk 24 records" in tiers
    m.close()
