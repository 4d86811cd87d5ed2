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
