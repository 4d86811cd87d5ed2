"""offload-bench decode-step: its floor computes what the engine computes, and its loops decode alike."""
from __future__ import annotations

import time

import pytest

from offload import OffloadedModel
from offload.bench import decode_step as db


@pytest.mark.parametrize("arch,bits", [("qwen3_moe", None), ("mixtral", "int4-g32"), ("gpt_oss", 8)])
def test_floor_is_bit_equal_to_run_layer(arch, bits, tiny_dir, tmp_path):
    """The bare-kernel floor reproduces run_layer exactly (dense, int4, int8, biased experts), one captured call
    per MoE layer, timed with either clock."""
    opts = {} if bits is None else {"bits": bits, "store": "disk", "store_dir": tmp_path / "s"}
    with OffloadedModel.from_pretrained(tiny_dir(arch), cache_experts=1 << 30, **opts) as m:
        calls = db.capture(m, db.prompt_ids(m))
        assert [c.module.layer_idx for c in calls] == m.engine.moe_layers
        assert all(c.hidden.shape[0] == 1 for c in calls)
        for clock in (time.perf_counter, time.thread_time):
            r = db.engine_overhead(m, calls, rounds=1, passes=1, clock=clock)
            assert r["bit_equal"] and r["layers"] == len(calls) and r["engine_us"] > 0 and r["floor_us"] > 0
        assert m.stats()["hits"] == 0  # the timed calls' counts are reset


def test_manual_loop_and_generate_decode_the_same_tokens(tiny_dir):
    with OffloadedModel.from_pretrained(tiny_dir("mixtral")) as m:
        ids = db.prompt_ids(m)
        _, manual = db.manual_decode(m, ids, 6)
        _, exact = db.generate_decode(m, ids, 6)
        assert manual == exact and len(exact) == 7
        r = db.generate_overhead(m, ids, n=4, rounds=1)
        assert set(r) == {"manual loop", "generate()"} and r["generate()"]["same_tokens"]


def test_llama4_is_refused(tiny_dir):
    with OffloadedModel.from_pretrained(tiny_dir("llama4_text")) as m, pytest.raises(ValueError, match="Llama-4"):
        db.capture(m, db.prompt_ids(m))
