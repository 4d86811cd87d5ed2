"""Three tiers: a RAM tier of stored records between the disk store and the device slots, device misses
copied or computed on the CPU where their record lies, and exact per-tier accounting."""
from __future__ import annotations

import pytest
import torch
from test_engine import greedy, layers_and_k, prompt, reference

from offload import OffloadConfig, OffloadedModel
from offload.engine.miss import CostModelMiss, MissCosts
from offload.errors import OffloadError
from cache import CacheStats


def uses_of(m: OffloadedModel, tokens: torch.Tensor) -> int:
    layers, k = layers_and_k(m)
    return (tokens.shape[1] - 1) * layers * k


def served(s: dict) -> int:
    t = s["tiers"]
    return t["device_hits"] + t["ram_hits"] + t["disk_reads"]


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_every_miss_mode_and_ram_size_is_token_identical(arch, tiny_dir, tmp_path):
    path = tiny_dir(arch)
    ids = prompt(3)
    want = greedy(reference(path), ids)
    k = OffloadedModel.from_pretrained(path).engine.top_k
    for ram, miss, cap in [("100%", "cpu", k), ("25%", "cpu", k), ("100%", "copy", k), ("50%", "copy", 2 * k),
                           ("25%", "auto", k)]:
        m = OffloadedModel.from_pretrained(path, store_dir=tmp_path / "s", ram_memory=ram, miss=miss, cache_experts=cap)
        got = greedy(m, ids)
        assert torch.equal(got, want), f"{arch} ram_memory={ram} miss={miss}: tokens differ from transformers"
        s = m.stats()
        t = s["tiers"]
        assert served(s) == uses_of(m, got) == s["hits"] + s["misses"]
        if miss == "copy":  # every device miss was copied out of RAM, none read the disk directly
            assert t["cpu_experts"] == 0 and t["device_hits"] == s["hits"]
            assert s["links"]["ram->device"]["loads"] == s["misses"] == t["ram_hits"] + t["disk_reads"]
            assert s["links"]["disk->ram"]["loads"] == t["disk_reads"]
        else:  # CPU: one pool, the RAM tier, where experts compute; nothing is copied into slots
            assert t["device_hits"] == 0 and (t["ram_hits"], t["disk_reads"]) == (s["hits"], s["misses"])
            assert set(s["links"]) == {"disk->ram"} and s["links"]["disk->ram"]["loads"] == t["disk_reads"]
        m.close()


class Alternate:
    """Copies even experts, computes odd ones on the CPU: both paths in one layer."""

    name = "alternate"

    def copy(self, key, weight) -> bool:
        return key[1] % 2 == 0


@pytest.mark.parametrize("bits", [None, "int4-g32", 8])
def test_mixed_copy_and_cpu_misses_in_one_layer_are_exact(bits, tiny_dir, tmp_path):
    """Per miss, copy or compute from RAM, mixed within a layer (what `auto` does): the same tokens as all
    resident, combined in expert order; each mode counted."""
    path = tiny_dir("mixtral")
    ids = prompt(4)
    full = OffloadedModel.from_pretrained(path, store_dir=tmp_path / "s", bits=bits)
    want = greedy(full, ids)
    m = OffloadedModel.from_pretrained(path, store_dir=tmp_path / "s", bits=bits, ram_memory="50%", miss="copy",
                                       cache_experts=2)
    m.engine.miss = Alternate()
    got = greedy(m, ids)
    assert torch.equal(got, want)
    s = m.stats()
    t = s["tiers"]
    assert 0 < t["cpu_experts"] and 0 < s["misses"]
    assert s["hits"] + s["misses"] + t["cpu_experts"] == uses_of(m, got)  # each use copied-and-computed or CPU
    assert served(s) == uses_of(m, got)
    assert t["ram_hits"] + t["disk_reads"] == served(s) - t["device_hits"]
    m.close()


def test_ram_tier_prefetch_hides_disk_reads_and_stays_exact(tiny_dir, tmp_path):
    path = tiny_dir("mixtral")
    ids = prompt(5)
    want = greedy(OffloadedModel.from_pretrained(path, store_dir=tmp_path / "s"), ids)
    m = OffloadedModel.from_pretrained(path, store_dir=tmp_path / "s", ram_memory="75%", miss="copy",
                                       cache_experts=8, predictor="gate", prefetch_min_precision=0.0)
    got = greedy(m, ids)
    assert torch.equal(got, want)
    s = m.stats()
    assert m.engine.ram.stats.prefetch_issued > 0  # predictions load disk -> RAM...
    assert s["prefetch_issued"] > 0                # ...and those already in RAM go on to the device
    assert not m.engine.ram.cache.pinned()         # every record read by a device prefetch was released
    assert served(s) == uses_of(m, got)
    m.close()


def test_quantized_records_compute_in_place_from_ram(tiny_dir, tmp_path):
    path = tiny_dir("mixtral")
    ids = prompt(6)
    full = OffloadedModel.from_pretrained(path, store_dir=tmp_path / "s", bits="int4-g32")
    want = greedy(full, ids)
    for ram in ("100%", "25%"):
        m = OffloadedModel.from_pretrained(path, store_dir=tmp_path / "s", bits="int4-g32", ram_memory=ram)
        assert m.plan.in_place and m.engine.tier == "ram"
        assert torch.equal(greedy(m, ids), want)
        m.close()


def test_plan_names_three_tiers(tiny_dir, tmp_path):
    path = tiny_dir("mixtral")
    m = OffloadedModel.from_pretrained(path, store_dir=tmp_path / "s", ram_memory="50%", miss="copy", cache_experts=2)
    tiers = dict(m.plan.rows())["tiers"]
    assert tiers.startswith("device 2 slots | RAM 12 records") and "miss=copy" in tiers and "| disk 24 records" in tiers
    m.close()
    m = OffloadedModel.from_pretrained(path, store_dir=tmp_path / "s", ram_memory="50%")
    assert dict(m.plan.rows())["tiers"].startswith("device = RAM tier (CPU, computed in place): 12 experts")
    m.close()


@pytest.mark.parametrize("options, words", [
    ({"ram_memory": "1GiB"}, "store_dir=PATH"),
    ({"ram_memory": "0%", "store_dir": "x"}, "ram_memory=auto"),
    ({"ram_memory": "lots", "store_dir": "x"}, "cannot read 'lots' as a size"),
    ({"miss": "gpu"}, "miss must be one of auto, copy, cpu"),
    ({"miss": "cpu"}, "give ram_memory=SIZE"),
])
def test_bad_tier_options_name_the_fix(options, words):
    with pytest.raises(OffloadError, match=words.replace("(", r"\(").replace(")", r"\)")):
        OffloadConfig(**options)


def test_a_ram_tier_too_small_or_too_big_is_refused_before_loading(tiny_dir, tmp_path):
    path = tiny_dir("mixtral")
    with pytest.raises(OffloadError, match=r"ram_memory=1\.0KiB holds 0 records, fewer than one layer's top-k = 2; "
                                           r"give ram_memory=\S+ or more"):
        OffloadedModel.from_pretrained(path, store_dir=tmp_path / "s", ram_memory="1KiB")
    from offload.plan import ram_slots

    with pytest.raises(OffloadError, match=r"ram_memory='100%' needs 23.4 KiB of RAM, but 4.9 KiB is left after "
                                           r"headroom .*; lower it to at most 5 records \(4.9KiB\)"):
        ram_slots("100%", total=24, record_bytes=1000, budget=5000, top_k=2)
    assert ram_slots("auto", total=24, record_bytes=1000, budget=5000, top_k=2) == 5
    assert ram_slots("auto", total=24, record_bytes=1000, budget=10**9, top_k=2) == 24


def test_cost_model_copies_experts_that_will_be_reused():
    stats = CacheStats()
    cheap_copy = CostModelMiss(MissCosts(copy_s=1e-4, cpu_s=5e-4, device_s=1e-5), stats)
    dear_copy = CostModelMiss(MissCosts(copy_s=5e-3, cpu_s=5e-4, device_s=1e-5), stats)
    assert cheap_copy.copy((0, 0), 0.5) and not dear_copy.copy((0, 0), 0.5)
    stats.hits, stats.misses = 990, 10  # a cache whose experts are reused ~100 times: the copy amortises
    assert dear_copy.copy((0, 0), 0.5)
    stats.hits, stats.misses = 0, 1000  # never reused: computing where the bytes are wins
    assert not CostModelMiss(MissCosts(copy_s=1e-3, cpu_s=5e-4, device_s=1e-5), stats).copy((0, 0), 0.5)


@pytest.mark.parametrize("slots, tiers", [(6, {}), (6, {"ram_memory": "50%", "miss": "copy"}), (8, {})])
def test_hot_set_from_a_trace_stays_pinned_and_exact(slots, tiers, tiny_dir, tmp_path):
    """The experts a recorded trace uses most are loaded at start and never evicted; the rest of the slots
    are a dynamic cache; tokens unchanged. 8 slots: a prefill layer's 8 experts would fit the pool, not the
    slots the hot set leaves."""
    path = tiny_dir("mixtral")
    ids = prompt(8)
    rec = OffloadedModel.from_pretrained(path, trace=True)
    want = greedy(rec, ids)
    rec.trace().save(tmp_path / "t.npz")
    m = OffloadedModel.from_pretrained(path, store_dir=tmp_path / "s", cache_experts=slots, hot_set=str(tmp_path / "t.npz"),
                                       **tiers)
    hot = m.engine.hot
    assert len(hot) == slots // 2 and all(k in m.engine.cache for k in hot)
    assert "hot set of" in dict(m.plan.rows())["tiers"]
    assert m.stats()["tiers"]["disk_reads"] == 0  # loading the hot set is not counted as the run's reads
    assert torch.equal(greedy(m, ids), want)
    assert all(k in m.engine.cache for k in hot)  # never evicted, though 6 slots cycle through 24 experts
    m.reset_cache()
    assert all(k in m.engine.cache for k in hot) and m.engine.cache.pinned() == set(hot)
    m.close()


def test_hot_set_of_another_model_is_refused(tiny_dir, tmp_path):
    rec = OffloadedModel.from_pretrained(tiny_dir("qwen2_moe"), trace=True)
    greedy(rec, prompt(1))
    rec.trace().save(tmp_path / "t.npz")
    with pytest.raises(OffloadError, match="record it on this model"):
        OffloadedModel.from_pretrained(tiny_dir("deepseek_v3"), cache_experts=8, hot_set=str(tmp_path / "t.npz"))


def test_hot_set_from_a_warm_up_text_pins_the_experts_its_routing_uses_most(tiny_dir, tmp_path):
    """A text instead of a trace: one forward over its first tokens, counted, then the same pinning."""
    path = tiny_dir("mixtral")
    words = " ".join(f"w{i % 40}" for i in range(120))
    (tmp_path / "warmup.txt").write_text(words)
    rec = OffloadedModel.from_pretrained(path, trace=True)
    rec(rec.tokenizer(words, return_tensors="pt").input_ids)
    counts = {}
    for li, layer in enumerate(rec.engine.moe_layers):
        for e in rec.trace().experts[:, li].ravel().tolist():
            counts[(layer, e)] = counts.get((layer, e), 0) + 1
    ids = prompt(8)
    want = greedy(rec, ids)
    m = OffloadedModel.from_pretrained(path, store_dir=tmp_path / "s", cache_experts=6,
                                       hot_set=str(tmp_path / "warmup.txt"))
    assert sorted(counts[k] for k in m.engine.hot) == sorted(counts.values())[-3:]
    assert m.engine.cache.pinned() == set(m.engine.hot) and m.engine.tracer is None
    assert "hot set of a warm-up on" in dict(m.plan.rows())["tiers"]
    assert m.stats()["tiers"]["disk_reads"] == 0 and m.stats()["tokens"] == 0  # the warm-up is not the run
    assert torch.equal(greedy(m, ids), want)
    m.close()


def test_a_warm_up_text_without_tokens_or_tokenizer_is_refused(tiny_dir, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(OffloadError, match="give a longer text"):
        OffloadedModel.from_pretrained(tiny_dir("mixtral"), cache_experts=8, hot_set=str(tmp_path / "empty.txt"))
    with pytest.raises(OffloadError, match=r"hot_set .*missing.txt not found; give a routing trace"):
        OffloadConfig(hot_set=str(tmp_path / "missing.txt"))
