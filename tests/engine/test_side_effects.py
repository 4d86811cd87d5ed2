"""Loading, converting and closing leave the process as they found it: hooks removed, log verbosity restored."""
from __future__ import annotations

import torch
import transformers

from offload import OffloadedModel


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def test_close_removes_the_forward_hooks(tiny_dir):
    m = OffloadedModel.from_pretrained(tiny_dir("mixtral"), cache_experts=4, predictor="gate", lookahead=0)
    hf = m.model
    assert _hook_count(hf) > 0, "lookahead 0 hooks layer entries and attention outputs"
    m.close()
    assert _hook_count(hf) == 0


def test_loading_restores_transformers_verbosity(tiny_dir, tmp_path):
    before = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_info()
    try:
        with OffloadedModel.from_pretrained(tiny_dir("qwen3_moe"), store="disk", store_dir=str(tmp_path / "s"),
                                            bits="int8", cache_experts=4):
            assert transformers.logging.get_verbosity() == transformers.logging.INFO
    finally:
        transformers.logging.set_verbosity(before)
