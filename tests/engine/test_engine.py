"""Reference equivalence: offloaded generation is token-identical to stock transformers (eager experts)."""
from __future__ import annotations

import pytest
import torch
from conftest import ARCHS
from transformers import AutoModelForCausalLM

from offload import OffloadedModel

NEW = 32


def reference(path, dtype=torch.bfloat16):
    kw = {} if "llama4" in str(path) else {"experts_implementation": "eager"}
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw).eval()


def prompt(seed: int = 0, length: int = 10) -> torch.Tensor:
    return torch.randint(3, 90, (1, length), generator=torch.Generator().manual_seed(seed))


def greedy(model, ids):
    return model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)


def layers_and_k(m: OffloadedModel) -> tuple[int, int]:
    return len(m.engine.moe_layers), m.engine.top_k


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_identical_at_min_quarter_and_full_capacity(arch, tiny_dir, tmp_path):
    path = tiny_dir(arch)
    ids = prompt()
    want = greedy(reference(path), ids)
    probe = OffloadedModel.from_pretrained(path)
    total, k = probe.stats()["total_experts"], probe.engine.top_k
    for store in ("ram", "disk"):
        for cap in (k, total // 4, total):
            m = OffloadedModel.from_pretrained(path, cache_experts=cap, store=store,
                                              store_dir=tmp_path / "store" if store == "disk" else None)
            got = greedy(m, ids)
            assert torch.equal(got, want), f"{arch} {store} capacity {cap}: tokens differ from transformers"
            s = m.stats()
            n_layers, k = layers_and_k(m)
            fed = got.shape[1] - 1  # every token but the last generated one passes through the model
            assert s["tokens"] == fed
            assert s["hits"] + s["misses"] == fed * n_layers * k, "every expert use is one hit or one miss"
            assert s["resident_experts"] <= cap
            assert s["bytes_loaded"][store] == s["misses"] * s["expert_bytes"]
            m.close()


@pytest.mark.parametrize("arch", ARCHS)
def test_layer_entry_prediction_is_lossless_and_prefetches(arch, tiny_dir):
    """Gate lookahead 0 (each layer's router on the residual stream entering it) in every architecture: the
    layer-entry hooks find the stream and the attention outputs, prefetches are issued, and the tokens stay
    transformers' own."""
    path = tiny_dir(arch)
    ids = prompt()
    want = greedy(reference(path), ids)
    probe = OffloadedModel.from_pretrained(path)
    total = probe.stats()["total_experts"]
    probe.close()
    with OffloadedModel.from_pretrained(path, cache_experts=total // 4, predictor="gate", lookahead=0) as m:
        assert torch.equal(greedy(m, ids), want), f"{arch}: tokens differ from transformers with gate d=0"
        assert m.stats()["prefetch_issued"] > 0
        # every MoE layer's attention output reached the predictor (added to the next token's entry guess)
        assert set(m.engine.predictor._attention) == set(m.engine.moe_layers), arch


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss", "llama4_text"])
def test_sampling_identical_with_fixed_seed(arch, tiny_dir):
    path = tiny_dir(arch)
    ids = prompt(1)
    kw = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=True, temperature=1.3, top_p=0.95)
    torch.manual_seed(7)
    want = reference(path).generate(ids, **kw)
    m = OffloadedModel.from_pretrained(path, cache_experts=5)
    torch.manual_seed(7)
    assert torch.equal(m.generate(ids, **kw), want)


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_forward_logits_bit_identical_fp32(arch, tiny_dir):
    path = tiny_dir(arch, torch.float32)
    ids = torch.randint(3, 90, (2, 24), generator=torch.Generator().manual_seed(3))
    want = reference(path, torch.float32)(ids).logits
    m = OffloadedModel.from_pretrained(path, dtype="float32", cache_experts=3)
    got = m(ids).logits
    assert got.dtype == torch.float32
    assert torch.equal(got, want)


def test_fp32_checkpoint_loaded_as_bf16_matches(tiny_dir):
    path = tiny_dir("qwen3_moe", torch.float32)
    ids = prompt(2)
    want = greedy(reference(path, torch.bfloat16), ids)
    m = OffloadedModel.from_pretrained(path, dtype=torch.bfloat16, cache_experts=4)
    assert m.stats()["expert_bytes"] == m.engine.store.layout.nbytes
    assert all(s.dtype == torch.bfloat16 for s in m.engine.store.layout.specs)
    assert torch.equal(greedy(m, ids), want)


def test_streamer_and_eos(tiny_dir):
    from transformers import TextIteratorStreamer

    path = tiny_dir("mixtral")
    m = OffloadedModel.from_pretrained(path, cache_experts=4)
    ids = prompt(4)
    full = greedy(m, ids)
    eos = int(full[0, ids.shape[1] + 5])
    stopped = m.generate(ids, max_new_tokens=NEW, do_sample=False, eos_token_id=eos)
    assert stopped.shape[1] <= ids.shape[1] + 6 and int(stopped[0, -1]) == eos
    streamer = TextIteratorStreamer(m.tokenizer, skip_prompt=True)
    import threading

    t = threading.Thread(target=m.generate, args=(ids,), kwargs=dict(max_new_tokens=8, min_new_tokens=8,
                                                                      do_sample=False, streamer=streamer))
    t.start()
    text = "".join(streamer)
    t.join()
    assert text.split() == m.tokenizer.decode(full[0, ids.shape[1]: ids.shape[1] + 8]).split()


def test_reset_stats_and_tokenizer(tiny_dir):
    m = OffloadedModel.from_pretrained(tiny_dir("olmoe"), cache_experts=4)
    assert m.tokenizer is not None and m.tokenizer("w1 w2")["input_ids"] == [4, 5]
    greedy(m, prompt())
    assert m.stats()["misses"] > 0
    m.reset_stats()
    s = m.stats()
    assert (s["hits"], s["misses"], s["evictions"], sum(s["bytes_loaded"].values())) == (0, 0, 0, 0)
    assert s["resident_experts"] == 4  # resetting counters keeps the cache warm


@pytest.mark.parametrize("bits", [8, "int4-g32", "int4-adaptive", "int3-g32", "int2-g32", "ternary", "ternary-z90",
                                  {"default": "int4-g32", "layers[0:1]": 8}])
def test_quantized_store_offloading_stays_lossless(bits, tiny_dir, tmp_path):
    """Offloading a quantized store changes nothing: tiny capacity + prefetch == everything resident."""
    path = tiny_dir("mixtral")
    ids = prompt(5)
    full = OffloadedModel.from_pretrained(path, bits=bits, store="disk", store_dir=tmp_path / "s")
    small = OffloadedModel.from_pretrained(path, bits=bits, store="disk", store_dir=tmp_path / "s", cache_experts=2,
                                           predictor="gate")
    assert torch.equal(greedy(full, ids), greedy(small, ids))
    s = small.stats()
    assert 0 < s["bytes_loaded"]["disk"] <= s["loads"] * small.engine.store.record_bytes  # lz4/lzma read less
    assert small.engine.store.record_bytes < full.source.layout.nbytes  # really compressed


def test_quantized_compute_matches_dequantized_weights(tiny_dir, tmp_path):
    """int8 experts through the engine == a stock model whose expert weights are the dequantized int8 weights."""
    from offload.formats.quant import dequantize, parse_format

    path = tiny_dir("qwen3_moe", torch.float32)
    m = OffloadedModel.from_pretrained(path, bits=8, store="disk", store_dir=tmp_path / "s", dtype="bfloat16")
    ref = reference(path, torch.bfloat16)
    store, codec = m.engine.store, m.engine.codec
    fmt = parse_format("int8")
    buf = torch.empty(store.record_bytes, dtype=torch.uint8)
    with torch.no_grad():
        for layer, block in enumerate(ref.model.layers):
            for e in range(8):
                store.read_into((layer, e), buf)
                kind = codec.kind_named(store.format_of((layer, e)))
                parts = kind.split(kind.storage.views(buf))
                for name, shape in zip(("gate_up", "down"), kind.shapes):
                    w = dequantize(parts[name], fmt, shape)
                    getattr(block.mlp.experts, name + "_proj")[e].copy_(w.to(torch.bfloat16))
    ids = torch.randint(3, 90, (1, 16), generator=torch.Generator().manual_seed(9))
    got, want = m(ids).logits.float(), ref(ids).logits.float()
    cos = torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0)
    assert cos > 0.999, f"int8 kernel path disagrees with dequantized reference (cosine {cos:.5f})"


def test_bits_without_disk_store_is_refused():
    from offload import OffloadConfig, OffloadError

    with pytest.raises(OffloadError, match="needs a converted store"):
        OffloadConfig(bits=4)
    with pytest.raises(OffloadError, match="unknown weight format"):
        OffloadConfig(bits="int5", store="disk", store_dir="/tmp/x")


def test_group_size_that_does_not_divide_is_named(tiny_dir, tmp_path):
    from offload import OffloadError

    with pytest.raises(OffloadError, match="int4-g128 needs the experts' input sizes"):
        OffloadedModel.from_pretrained(tiny_dir("mixtral"), bits=4, store="disk", store_dir=tmp_path / "s")


def test_checkpoint_saved_in_fused_v5_layout(tiny_dir, tmp_path):
    """A checkpoint whose experts are stored fused ([E, 2I, H], transformers' in-memory layout) loads too."""
    import shutil

    from safetensors.torch import load_file, save_file

    src = tiny_dir("qwen3_moe")
    shutil.copytree(src, tmp_path / "m")
    f = next((tmp_path / "m").glob("*.safetensors"))
    t = load_file(f)
    for layer in range(3):
        p = f"model.layers.{layer}.mlp.experts"
        gate = [t.pop(f"{p}.{e}.gate_proj.weight") for e in range(8)]
        up = [t.pop(f"{p}.{e}.up_proj.weight") for e in range(8)]
        down = [t.pop(f"{p}.{e}.down_proj.weight") for e in range(8)]
        t[f"{p}.gate_up_proj"] = torch.stack([torch.cat([g, u]) for g, u in zip(gate, up)])
        t[f"{p}.down_proj"] = torch.stack(down)
    save_file(t, f, metadata={"format": "pt"})
    ids = prompt(6)
    want = greedy(reference(src), ids)
    assert torch.equal(greedy(OffloadedModel.from_pretrained(tmp_path / "m", cache_experts=3), ids), want)


def test_prefetch_pauses_while_predictions_are_wrong(tiny_dir):
    """Below prefetch_min_precision the engine stops prefetching (a wrong prefetch evicts a needed expert)
    but keeps scoring predictions; results never change."""
    path = tiny_dir("mixtral")
    ids = prompt(7)
    runs = {}
    for floor in (0.0, 1.0):
        m = OffloadedModel.from_pretrained(path, cache_experts=10, predictor="gate", prefetch_min_precision=floor)
        runs[floor] = (greedy(m, ids), m.stats())
    (tokens0, s0), (tokens1, s1) = runs[0.0], runs[1.0]
    assert torch.equal(tokens0, tokens1)
    assert s0["prefetch_suppressed"] == 0 and s0["prefetch_issued"] > 0
    assert s1["prefetch_precision"] < 1.0  # the random tiny model's gate is often wrong...
    assert s1["prefetch_suppressed"] > 0 and s1["prefetch_issued"] < s0["prefetch_issued"]  # ...so it pauses


def test_prefetch_precision_scores_the_top_k_guess_at_any_width(tiny_dir):
    """Extra prefetched ids (prefetch_width > k) are a margin, not the guess: precision, and so pausing, is the
    same as at width k, while more experts are fetched ahead."""
    path = tiny_dir("mixtral")
    ids = prompt(7)
    runs = {}
    for width in (2, 4):
        m = OffloadedModel.from_pretrained(path, cache_experts=10, predictor="gate", prefetch_width=width,
                                           prefetch_min_precision=0.0)
        runs[width] = (greedy(m, ids), m.stats())
    (tokens2, s2), (tokens4, s4) = runs[2], runs[4]
    assert torch.equal(tokens2, tokens4)
    assert 0.0 < s2["prefetch_precision"] == s4["prefetch_precision"]
    assert s4["prefetch_issued"] > s2["prefetch_issued"]


def test_every_computed_slot_is_released_to_the_copy_stream(tiny_dir, monkeypatch):
    """After an expert's compute is queued the engine calls Prefetcher.used(slot) (on CUDA: an event the
    next copy into that slot waits for), once per fetched expert, with the slot fetch returned."""
    from offload.engine.prefetch import Prefetcher

    log = []
    fetch, used = Prefetcher.fetch, Prefetcher.used
    monkeypatch.setattr(Prefetcher, "fetch", lambda self, *a, **k: log.append(("fetch", fetch(self, *a, **k)))
                        or log[-1][1])
    monkeypatch.setattr(Prefetcher, "used", lambda self, slot: (log.append(("used", slot)), used(self, slot)))
    m = OffloadedModel.from_pretrained(tiny_dir("mixtral"), cache_experts=3, predictor="gate")
    greedy(m, prompt(5))
    m.close()
    assert len(log) > 40
    assert log[0::2] == [("fetch", s) for _, s in log[1::2]] and all(op == "used" for op, _ in log[1::2])


def test_prefetch_never_evicts_recent_experts_or_those_of_paused_layers(tiny_dir):
    """A prefetch may displace only experts unused for a full pass over the layers, and never one of a layer
    whose prefetching is paused (nothing else brings that layer's experts in ahead of time)."""
    m = OffloadedModel.from_pretrained(tiny_dir("mixtral"), cache_experts=4, predictor="gate",
                                       prefetch_min_precision=0.5)
    e = m.engine
    greedy(m, prompt(3))
    first, second = e.moe_layers[:2]
    old = (second, 0)
    e._last_use[old] = e._step - len(e.moe_layers)  # last used a full pass ago
    e._last_use[(first, 0)] = e._step                 # used in this pass
    e._precision = {first: 0.9, second: 0.9}
    assert not e._protected(old) and e._protected((first, 0))
    e._precision[second] = 0.4  # below prefetch_min_precision: paused
    assert e._protected(old) and e._protected((second, 5))
    m.close()


@pytest.mark.parametrize("arch", ARCHS)
def test_one_token_path_is_bit_identical_to_the_general_path(arch, tiny_dir):
    """Decode steps (one token) take Engine._run_token; forced through the general path instead, every logit
    is bit-identical and the cache sees the same hits, misses, evictions and bytes, at a small capacity (misses,
    evictions) and with every expert resident."""
    path = tiny_dir(arch)
    ids = prompt(8)
    total = OffloadedModel.from_pretrained(path).stats()["total_experts"]
    for cap in (total // 4, total):
        runs = []
        for general in (False, True):
            m = OffloadedModel.from_pretrained(path, cache_experts=cap)
            token_path = m.engine._run_token
            taken = []
            m.engine._run_token = (lambda *a: None) if general else (lambda *a: taken.append(token_path(*a))
                                                                    or taken[-1])
            out = m(ids, use_cache=True)
            logits = [out.logits]
            for _ in range(12):
                out = m(out.logits[:, -1:].argmax(-1), cache=out.cache, use_cache=True)
                logits.append(out.logits)
            s = m.stats()
            runs.append((logits, {k: s[k] for k in ("hits", "misses", "evictions", "bytes_loaded", "tokens")}))
            if not general and arch != "llama4_text":  # Llama-4 hands every token to every expert: its own path
                assert len(taken) == 12 * len(m.engine.moe_layers) and all(t is not None for t in taken)
            m.close()
        (fast, s_fast), (slow, s_slow) = runs
        assert all(torch.equal(a, b) for a, b in zip(fast, slow)), f"{arch} capacity {cap}: logits differ"
        assert s_fast == s_slow, f"{arch} capacity {cap}: accounting differs"
