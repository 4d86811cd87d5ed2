"""Bad input gets one OffloadError naming the fix - never a traceback from deep inside."""
from __future__ import annotations

import json

import pytest
import torch

from offload import OffloadConfig, OffloadedModel, OffloadError


def test_missing_directory(tmp_path):
    with pytest.raises(OffloadError, match="does not exist"):
        OffloadedModel.from_pretrained(tmp_path / "nope")


def test_directory_without_config(tmp_path):
    with pytest.raises(OffloadError, match="no config.json"):
        OffloadedModel.from_pretrained(tmp_path)


def test_dense_model_is_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=64)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    with pytest.raises(OffloadError, match="dense model") as e:
        OffloadedModel.from_pretrained(tmp_path)
    assert "mixtral" in str(e.value)


def test_unsupported_moe_names_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "jamba", "num_experts": 4}))
    with pytest.raises(OffloadError, match="not supported") as e:
        OffloadedModel.from_pretrained(tmp_path)
    for name in ("mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss", "llama4_text"):
        assert name in str(e.value)


def test_capacity_below_top_k_names_minimum(tiny_dir):
    with pytest.raises(OffloadError, match="give cache_experts=2 or more"):
        OffloadedModel.from_pretrained(tiny_dir("mixtral"), cache_experts=1)
    with pytest.raises(OffloadError, match="at least one layer's top-k = 2"):
        OffloadedModel.from_pretrained(tiny_dir("mixtral"), cache_memory="1KiB")


def test_capacity_beyond_free_memory_is_refused_before_allocating(tiny_dir, monkeypatch):
    """An explicit cache size that cannot fit is a one-line error naming the most that fits, not an OOM kill."""
    import offload.plan as plan

    path = tiny_dir("mixtral")
    m = OffloadedModel.from_pretrained(path, cache_experts=2)
    need = plan.MIN_HEADROOM + m.plan.non_expert_bytes + m.plan.kv_bytes + 5 * m.plan.expert_bytes
    m.close()
    monkeypatch.setattr(plan, "device_free", lambda device: need)
    with OffloadedModel.from_pretrained(path) as auto:  # no size given: as many as fit
        assert auto.plan.capacity == 5
    with pytest.raises(OffloadError, match="cache_experts=6 needs .* lower it to at most 5 experts"):
        OffloadedModel.from_pretrained(path, cache_experts=6)
    with pytest.raises(OffloadError, match="cache_memory="):
        OffloadedModel.from_pretrained(path, cache_memory=str(6 * m.plan.expert_bytes))


@pytest.mark.parametrize("options, message", [
    (dict(store="tape"), "store must be one of"),
    (dict(store="disk"), "needs store_dir"),
    (dict(device="tpu"), "device must be"),
    (dict(dtype="int7"), "unsupported dtype"),
    (dict(cache_experts=0), "cache_experts=0 is not a slot count"),
    (dict(cache_experts="150%"), "at most 100%"),
    (dict(cache_memory="0%"), "cache_memory='0%' is not a positive size"),
    (dict(cache_memory="lots"), "cannot read 'lots' as a size"),
    (dict(cache_experts=4, cache_memory="1GiB"), "not both"),
    (dict(policy="random"), "unknown policy"),
    (dict(policy="belady"), r"belady .* only on recorded traces \(offload-bench policies\)"),
    (dict(store="ram", store_dir="/tmp/s"), r"store_dir=/tmp/s is for the disk store.*drop store='ram'"),
    (dict(lookahead=-1), "lookahead"),
    (dict(lookahead=9), "lookahead"),
    (dict(colour="blue"), "unknown option"),
])
def test_invalid_options(options, message):
    with pytest.raises(OffloadError, match=message):
        OffloadConfig.from_options(**options)


def test_cuda_requested_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(OffloadError, match="no CUDA GPU"):
        OffloadConfig(device="cuda")


def test_mxfp4_checkpoint_is_named(tmp_path, tiny_dir):
    import shutil

    from safetensors.torch import load_file, save_file

    src = tiny_dir("gpt_oss")
    shutil.copytree(src, tmp_path / "m")
    f = next((tmp_path / "m").glob("*.safetensors"))
    tensors = load_file(f)
    tensors["model.layers.0.mlp.experts.gate_up_proj_blocks"] = torch.zeros(8, 4, dtype=torch.uint8)
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(OffloadError, match="MXFP4"):
        OffloadedModel.from_pretrained(tmp_path / "m")


def test_sizes_parse():
    from offload.config import parse_bytes

    assert parse_bytes("2GiB") == 2 * 2**30
    assert parse_bytes("512MB") == 512 * 10**6
    assert parse_bytes("1.5 KiB") == 1536
    assert parse_bytes(123) == 123


def test_store_dir_alone_means_the_disk_store():
    assert OffloadConfig(store_dir="/tmp/s").store == "disk"
    assert OffloadConfig().store == "ram"


def test_no_policy_list_offers_belady():
    with pytest.raises(OffloadError, match="unknown policy") as e:
        OffloadConfig(policy="random")
    assert "belady" not in str(e.value) and "lru" in str(e.value)


def test_cache_larger_than_the_model_is_capped_and_says_so(tiny_dir):
    with OffloadedModel.from_pretrained(tiny_dir("mixtral"), cache_experts=1000) as m:
        assert m.plan.capacity == m.plan.total_experts == 24 and m.engine.cache.capacity == 24
        resident = dict(m.plan.rows())["resident experts"]
        assert "cache_experts=1000 capped to the model's 24" in resident
    with OffloadedModel.from_pretrained(tiny_dir("mixtral"), cache_experts=24) as m:
        assert "capped" not in dict(m.plan.rows())["resident experts"]


def test_corrupt_tokenizer_is_named(tiny_dir, tmp_path):
    import shutil

    shutil.copytree(tiny_dir("mixtral"), tmp_path / "m")
    (tmp_path / "m" / "tokenizer.json").write_text('{"version": "1.0", "trunc')
    with pytest.raises(OffloadError, match=r"cannot load the tokenizer in .*m \(tokenizer.json.*re-download"):
        OffloadedModel.from_pretrained(tmp_path / "m")


def test_corrupt_config_is_named(tiny_dir, tmp_path):
    import shutil

    shutil.copytree(tiny_dir("mixtral"), tmp_path / "m")
    (tmp_path / "m" / "config.json").write_bytes(b'{"model_type": "mixt')
    with pytest.raises(OffloadError, match=r"cannot read .*config.json.*re-download"):
        OffloadedModel.from_pretrained(tmp_path / "m")


def test_cache_sizes_as_shares(tiny_dir):
    """cache_experts='25%' is a quarter of all experts; cache_memory='50%' half of all expert bytes."""
    path = tiny_dir("mixtral")
    with OffloadedModel.from_pretrained(path, cache_experts="25%") as m:
        total = m.plan.total_experts
        assert m.plan.capacity == round(total / 4) and m.config.cache_experts == "25%"
        rows = dict(m.plan.rows())
        assert rows["resident experts"].startswith(f"{round(total / 4)} of {total} (25%")
        assert rows["cache policy"] == "lru" and rows["predictor"].startswith("none")
        assert rows["CPU threads"] == str(torch.get_num_threads()) and rows["expert format"].startswith("dense")
    with OffloadedModel.from_pretrained(path, cache_memory="50%") as m:
        assert m.plan.capacity == total // 2
    assert OffloadConfig(cache_experts="16").cache_experts == 16
