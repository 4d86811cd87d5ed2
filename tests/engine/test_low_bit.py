"""HOBBIT mixed precision on a miss (low_bit_miss): low-weight device misses computed from a low-bit copy.

Threshold 0 is today's engine exactly; a layer's output is the full expert's plus the low-bit copy's, as computed
by a model converted wholly in the low-bit format; every miss served low-bit is the low-bit model; exact
accounting; the repeat rule; the copy's store is checksummed and reused; bad values name the fix.
"""
from __future__ import annotations

import pytest
import torch
from test_engine import greedy, prompt

from offload import OffloadConfig, OffloadedModel
from offload.cli.common import cli_wording
from offload.errors import OffloadError
from offload.store.convert import LOW_BIT_DIR
from offload.store.disk import DATA

MAIN, LOW = "int4-g32", "int2-g32"


def load(path, store_dir, **options) -> OffloadedModel:
    return OffloadedModel.from_pretrained(path, store_dir=store_dir, bits=MAIN, **options)


def uses_of(m: OffloadedModel, tokens: torch.Tensor) -> int:
    return (tokens.shape[1] - 1) * len(m.engine.moe_layers) * m.engine.top_k


def experts_module(m: OffloadedModel, layer: int):
    return next(mod for mod in m.model.modules() if getattr(mod, "layer_idx", None) == layer and hasattr(mod, "engine"))


@pytest.mark.parametrize("arch", ["mixtral", "phimoe"])  # experts int4-g32 and int2-g32 fit
def test_threshold_zero_is_todays_engine(arch, tiny_dir, tmp_path):
    path, ids = tiny_dir(arch), prompt(1)
    with load(path, tmp_path / "s", cache_experts="25%") as plain:
        want, counts = greedy(plain, ids), plain.stats()
    with load(path, tmp_path / "s", cache_experts="25%", low_bit_miss=LOW, low_bit_threshold=0) as m:
        got, s = greedy(m, ids), m.stats()
    assert torch.equal(got, want)
    assert (s["hits"], s["misses"], s["bytes_loaded"]) == (counts["hits"], counts["misses"], counts["bytes_loaded"])
    assert s["low_bit"]["computes"] == s["low_bit"]["loads_avoided"] == 0


@pytest.mark.parametrize("tokens", [1, 3])
def test_a_low_weight_miss_is_the_low_bit_experts_output(tokens, tiny_dir, tmp_path):
    """One layer, experts a (weight 0.8, full) and b (0.2, low-bit): the output is a's from the int4 store plus
    b's from a model converted wholly to int2, the same sums in the same order."""
    path = tiny_dir("mixtral")
    m = load(path, tmp_path / "s", cache_experts="100%", low_bit_miss=LOW, low_bit_threshold=0.5)
    low = OffloadedModel.from_pretrained(path, store_dir=tmp_path / "low", bits=LOW, cache_experts="100%")
    layer = m.engine.moe_layers[0]
    H = m.model.config.hidden_size
    hidden = torch.randn(tokens, H, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    a, b = 3, 1
    index = torch.tensor([[a, b]] * tokens)
    weights = torch.tensor([[0.8, 0.2]] * tokens, dtype=torch.bfloat16)
    with torch.inference_mode():
        got = m.engine.run_layer(experts_module(m, layer), hidden, index, weights)
        full_a = m.engine.run_layer(experts_module(m, layer), hidden, index[:, :1], weights[:, :1])
        low_b = low.engine.run_layer(experts_module(low, layer), hidden, index[:, 1:], weights[:, 1:])
    assert torch.equal(got, full_a + low_b)
    s = m.stats()
    assert s["low_bit"]["computes"] == tokens and s["low_bit"]["loads_avoided"] == 1
    assert (layer, b) not in m.engine.cache and (layer, a) in m.engine.cache
    m.close()
    low.close()


def test_every_miss_served_low_bit_is_the_low_bit_model(tiny_dir, tmp_path):
    """Threshold 1 and no repeat rule: no full record is ever loaded, so every use is the low-bit copy."""
    path, ids = tiny_dir("mixtral"), prompt(2)
    with OffloadedModel.from_pretrained(path, store_dir=tmp_path / "low", bits=LOW, cache_experts="100%") as low:
        want = greedy(low, ids)
    with load(path, tmp_path / "s", cache_experts="25%", low_bit_miss=LOW, low_bit_threshold=1) as m:
        m.engine.low_bit.repeat = 1 << 30
        got, s = greedy(m, ids), m.stats()
    assert torch.equal(got, want)
    assert s["hits"] == s["misses"] == 0 and s["bytes_loaded"] == {}
    assert s["low_bit"]["computes"] == uses_of(m, got) and s["tiers"]["low_bit_computes"] == uses_of(m, got)


@pytest.mark.parametrize("predictor", [None, "gate"])
def test_full_hits_loads_and_low_bit_computes_add_up_to_the_uses(predictor, tiny_dir, tmp_path):
    path, ids = tiny_dir("mixtral"), prompt(4)
    with load(path, tmp_path / "s", cache_experts="25%", low_bit_miss=LOW, low_bit_threshold=0.45,
              predictor=predictor, lookahead=0) as m:
        got, s = greedy(m, ids), m.stats()
    low = s["low_bit"]
    assert s["hits"] + s["misses"] + low["computes"] == uses_of(m, got)
    assert low["computes"] > 0 and s["misses"] > 0 and low["promoted"] > 0
    assert low["loads_avoided"] <= low["computes"]
    assert s["tiers"]["low_bit_computes"] == low["computes"]
    assert low["bytes_read_at_load"] > 0 and s["links"]


def test_an_expert_served_low_bit_repeatedly_loads_in_full(tiny_dir, tmp_path):
    with load(tiny_dir("mixtral"), tmp_path / "s", cache_experts="25%", low_bit_miss=LOW) as m:
        rule = m.engine.low_bit
        assert (rule.repeat, rule.window, rule.threshold) == (2, 16, 0.25)
        key = (m.engine.moe_layers[0], 0)
        assert not rule.serves(key, 0.25, 0, 1)  # at the threshold: the full record
        assert [rule.serves(key, 0.1, t, 1) for t in (0, 1, 2, 3)] == [True, True, False, True]
        assert [rule.serves(key, 0.1, t, 1) for t in (30, 50, 51, 52)] == [True, True, True, False]  # 30 aged out
        assert (rule.served, rule.promoted, rule.computes) == (6, 2, 6)


def test_the_low_bit_store_is_checksummed_and_reused(tiny_dir, tmp_path):
    path = tiny_dir("mixtral")
    load(path, tmp_path / "s", low_bit_miss=LOW).close()
    data = tmp_path / "s" / LOW_BIT_DIR.format(LOW) / DATA
    written = data.stat().st_mtime_ns
    load(path, tmp_path / "s", low_bit_miss=LOW).close()
    assert data.stat().st_mtime_ns == written
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(OffloadError, match="checksum mismatch"):
        load(path, tmp_path / "s", low_bit_miss=LOW)


def test_the_plan_names_the_low_bit_copies(tiny_dir, tmp_path):
    with load(tiny_dir("mixtral"), tmp_path / "s", low_bit_miss=LOW, low_bit_threshold=0.3) as m:
        rows = dict(m.plan.rows())
    assert rows["low-bit copies (HOBBIT)"].startswith(f"{LOW}, {len(m.source.keys())} records in RAM")
    assert "routing weight 0.3" in rows["low-bit copies (HOBBIT)"]


@pytest.mark.parametrize("options, words", [
    ({"store_dir": "s", "low_bit_threshold": 0.2}, "add low_bit_miss=int2-g32"),
    ({"low_bit_miss": LOW}, "add store_dir=PATH"),
    ({"store_dir": "s", "low_bit_miss": "bf16"}, "quantized format like 'int2-g32'"),
    ({"store_dir": "s", "low_bit_miss": 2}, "quantized format like 'int2-g32'"),
    ({"store_dir": "s", "low_bit_miss": LOW, "ram_memory": "50%"}, "drop ram_memory or low_bit_miss"),
    ({"store_dir": "s", "low_bit_miss": LOW, "low_bit_threshold": 1.5}, "in [0, 1]"),
    ({"store_dir": "s", "low_bit_miss": LOW, "low_bit_threshold": -0.1}, "in [0, 1]"),
    ({"store_dir": "s", "low_bit_miss": LOW, "low_bit_threshold": True}, "in [0, 1]"),
])
def test_bad_low_bit_options_name_the_fix(options, words):
    with pytest.raises(OffloadError) as e:
        OffloadConfig(**options)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_the_cli_says_the_flags():
    assert cli_wording("add low_bit_miss=int2-g32") == "add --low-bit-miss int2-g32"
    assert cli_wording("low_bit_threshold=0.25") == "--low-bit-threshold 0.25"


def test_bench_run_takes_the_flags_and_keeps_the_ceiling_full_precision(tiny_dir, tmp_path):
    import json

    from typer.testing import CliRunner

    from offload.bench.app import app

    rows = {}
    for name, flags in (("demand", []), ("hobbit", ["--low-bit-miss", LOW, "--low-bit-threshold", "0.45"])):
        js = tmp_path / f"{name}.json"
        r = CliRunner().invoke(app, ["run", str(tiny_dir("mixtral")), "--store-dir", str(tmp_path / "s"), "--bits", MAIN,
                                     "--cache-experts", "25%", "--max-new-tokens", "4", "--repeats", "1",
                                     "--json", str(js), *flags])
        assert r.exit_code == 0, r.output
        rows[name] = json.loads(js.read_text())["rows"]
    assert rows["hobbit"][0]["low_bit_miss"] is None and rows["hobbit"][0]["hit_rate"] == 1.0
    assert rows["hobbit"][1]["bytes_per_token"] < rows["demand"][1]["bytes_per_token"]
