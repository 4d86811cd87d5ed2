"""LExI (active_experts=FRACTION): per-layer top-k trimmed from transformers' own routing result.

Reference equivalence (FRACTION=1 is stock; a trimmed model equals transformers whose routers are trimmed the
same way, and equals transformers' routers asked for k' directly), exact accounting, the budget, the cache
next to a disk store, and bad values.
"""
from __future__ import annotations

import pytest
import torch
from conftest import ARCHS
from tiny_models import build
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from offload import OffloadConfig, OffloadedModel, OffloadError
from offload.engine.active_experts import CACHE, ActiveExperts, Routing, trim
from predictors import find_routers

# (arch, overrides, whether the router normalises its top-k): top-4 of 8, so FRACTION=0.5 mixes k' over layers
TOP4 = {"mixtral": ({}, True), "qwen3_norm": ({"norm_topk_prob": True}, True),
        "qwen3_raw": ({"norm_topk_prob": False}, False), "deepseek_v3": ({}, True)}




def reference(path, dtype=torch.bfloat16):
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, experts_implementation="eager").eval()


def prompt(seed: int = 0, length: int = 10) -> torch.Tensor:
    return torch.randint(3, 90, (1, length), generator=torch.Generator().manual_seed(seed))


def greedy(model, ids, n: int = 24):
    return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)


@pytest.fixture(scope="module")
def top4(tmp_path_factory):
    made = {}

    def get(name: str, dtype=torch.bfloat16):
        if (name, dtype) not in made:
            arch = "qwen3_moe" if name.startswith("qwen3") else name
            made[name, dtype] = build(arch, tmp_path_factory.mktemp(name), dtype=dtype, num_experts_per_tok=4,
                                      **TOP4[name][0])
        return made[name, dtype]

    return get


def trimmed_reference(path, k: dict[int, int], normalised: bool, by_score: bool, dtype=torch.bfloat16):
    """Stock transformers (eager experts) whose routers' output is cut to k[layer] columns here, plainly."""
    model = reference(path, dtype)
    for layer, router in find_routers(model).items():
        def forward(h, orig=router.forward, kk=k[layer]):
            logits, w, idx = orig(h)
            if kk == idx.shape[1]:  # a layer that keeps every expert keeps the router's weights untouched
                return logits, w, idx
            if not by_score:
                order = torch.argsort(w, dim=-1, descending=True, stable=True)
                idx, w = idx.gather(1, order), w.gather(1, order)
            idx, w = idx[:, :kk], w[:, :kk]
            if normalised:
                total = getattr(router, "routed_scaling_factor", 1.0)
                w = (w.float() / w.float().sum(-1, keepdim=True) * total).to(w.dtype)
            return logits, w, idx
        router.forward = forward
    return model


def fewer_reference(path, k: dict[int, int], dtype=torch.bfloat16):
    """Stock transformers whose routers are asked for k[layer] experts directly (their own top-k and norm)."""
    model = reference(path, dtype)
    for layer, router in find_routers(model).items():
        router.top_k = k[layer]
    return model


# --- reference equivalence -----------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_fraction_one_is_bit_identical_to_stock(arch, tiny_dir):
    path = tiny_dir(arch, torch.float32)
    ids = torch.randint(3, 90, (2, 16), generator=torch.Generator().manual_seed(3))
    want = reference(path, torch.float32)(ids).logits
    with OffloadedModel.from_pretrained(path, dtype="float32", cache_experts=3, active_experts=1.0) as m:
        assert set(m.stats()["active_experts"].values()) == {m.engine.top_k}
        assert torch.equal(m(ids).logits, want)


@pytest.mark.parametrize("name", list(TOP4))
def test_half_equals_transformers_routing_trimmed_the_same_way(name, top4):
    path = top4(name)
    normalised = TOP4[name][1]
    by_score = name != "deepseek_v3"  # DeepSeek's top-k is unsorted (sorted=False)
    ids = prompt()
    with OffloadedModel.from_pretrained(path, cache_experts=6, active_experts=0.5) as m:
        k = m.stats()["active_experts"]
        assert sum(k.values()) == 6 and len(set(k.values())) > 1, k  # 0.5 x 4 x 3 layers, mixed
        got = greedy(m, ids)
    assert torch.equal(got, greedy(trimmed_reference(path, k, normalised, by_score), ids)), name
    assert torch.equal(got, greedy(fewer_reference(path, k), ids)), f"{name}: differs from its router at top-k'"


@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "llama4_text"])
def test_top1_equals_each_architectures_router_at_top1(arch, tiny_dir):
    """Every architecture's trim and renormalisation (top-2 -> 1 everywhere) against its own router asked for one
    expert; Phi's sparsemixer always picks two, so its reference drops the second, weights untouched."""
    path = tiny_dir(arch)
    ids = prompt(1)
    with OffloadedModel.from_pretrained(path, cache_experts=4, active_experts=0.5) as m:
        k = m.stats()["active_experts"]
        assert set(k.values()) == {1}
        got = greedy(m, ids)
    ref = trimmed_reference(path, k, False, True) if arch == "phimoe" else fewer_reference(path, k)
    assert torch.equal(got, greedy(ref, ids)), arch


@pytest.mark.parametrize("name", ["mixtral", "qwen3_norm"])
def test_trimmed_logits_bit_identical_fp32(name, top4):
    path = top4(name, torch.float32)
    ids = torch.randint(3, 90, (2, 16), generator=torch.Generator().manual_seed(5))
    with OffloadedModel.from_pretrained(path, dtype="float32", cache_experts=6, active_experts=0.5) as m:
        got, k = m(ids).logits, m.stats()["active_experts"]
    assert torch.equal(got, trimmed_reference(path, k, True, True, torch.float32)(ids).logits)


def test_hits_plus_misses_per_token_are_the_trimmed_k(top4):
    with OffloadedModel.from_pretrained(top4("qwen3_norm"), cache_experts=5, active_experts=0.75) as m:
        k = m.stats()["active_experts"]
        assert sum(k.values()) == 9
        got = greedy(m, prompt(2))
        s = m.stats()
    fed = got.shape[1] - 1
    assert s["tokens"] == fed
    assert s["hits"] + s["misses"] == fed * sum(k.values())
    assert s["misses"] > 0


@pytest.mark.parametrize("ram, miss", [("50%", "copy"), ("25%", "cpu")])
def test_ram_tier_and_miss_modes_serve_the_same_trimmed_model(top4, tmp_path, ram, miss):
    """With a RAM tier (its own, or the CPU's one in-place pool) the chosen k, the tokens and the per-token uses are
    those of the plain ram store."""
    path = top4("qwen3_norm")
    ids = prompt(4)
    with OffloadedModel.from_pretrained(path, cache_experts=6, active_experts=0.5) as m:
        k, want = m.stats()["active_experts"], greedy(m, ids)
    with OffloadedModel.from_pretrained(path, store_dir=tmp_path / "s", ram_memory=ram, miss=miss, cache_experts=6,
                                        active_experts=0.5) as m:
        assert m.stats()["active_experts"] == k
        got, s = greedy(m, ids), m.stats()
    assert torch.equal(got, want)
    t = s["tiers"]
    assert t["device_hits"] + t["ram_hits"] + t["disk_reads"] == s["hits"] + s["misses"]
    assert s["hits"] + s["misses"] == (got.shape[1] - 1) * sum(k.values())


def test_trace_records_the_trimmed_routing_and_replays_to_the_engine_counts(top4):
    from cache.simulate import replay

    with OffloadedModel.from_pretrained(top4("mixtral"), cache_experts=5, active_experts=0.5, trace=True) as m:
        k = m.stats()["active_experts"]
        m.generate(prompt(3), max_new_tokens=6, do_sample=False)
        s, trace = m.stats(), m.trace()
    per_layer = trace.valid.sum(axis=-1)  # [T, L]: experts recorded per token and layer
    assert (per_layer == [k[layer] for layer in trace.moe_layers]).all()
    sim = replay(trace, "lru", 5, batched_prefill=True)
    assert (sim.hits, sim.misses) == (s["hits"], s["misses"])


def test_prefetch_guesses_and_scores_each_layer_at_its_own_k(tiny_dir):
    """A layer trimmed to k' is guessed k' wide (the default width is top-k) and its precision is scored against
    its k' choices, so a right top-1 guess counts as right, not as half right."""
    path = tiny_dir("mixtral")
    ids = prompt(7)
    with OffloadedModel.from_pretrained(path, cache_experts=6, active_experts=0.5) as m:
        want = greedy(m, ids)
    with OffloadedModel.from_pretrained(path, cache_experts=6, active_experts=0.5, predictor="gate",
                                        prefetch_min_precision=0.0) as m:
        assert set(m.stats()["active_experts"].values()) == {1}
        assert torch.equal(greedy(m, ids), want)
        s = m.stats()
        forwards = want.shape[1] - ids.shape[1]  # one prefill and n - 1 decode steps
        targets = len(m.engine.moe_layers) - 1    # lookahead 1: every layer but the first is predicted
        assert 0 < s["prefetch_issued"] + s["prefetch_suppressed"] <= forwards * targets * 1
        layer = m.engine.moe_layers[1]
        m.engine._precision[layer] = 1.0
        m.engine._predicted[layer] = [5]
        m.engine._score(layer, torch.tensor([[5]]))
        assert m.engine._precision[layer] == 1.0


# --- known answers ---------------------------------------------------------------------------------
def test_trim_keeps_the_best_columns_and_renormalises_where_the_router_does():
    idx = torch.tensor([[5, 2, 7]])
    w = torch.tensor([[0.5, 0.3, 0.2]])
    i, v = trim(idx, w, 2, Routing(True, 1.0))
    assert i.tolist() == [[5, 2]] and torch.allclose(v, torch.tensor([[0.625, 0.375]]))
    i, v = trim(idx, w, 2, Routing(True, None))
    assert i.tolist() == [[5, 2]] and torch.equal(v, w[:, :2])
    i, v = trim(torch.tensor([[7, 2, 5]]), torch.tensor([[0.2, 0.3, 0.5]]) * 2.5, 2, Routing(False, 2.5))
    assert i.tolist() == [[5, 2]] and torch.allclose(v, torch.tensor([[1.5625, 0.9375]]))
    assert trim(idx, w, 3, Routing(True, 1.0)) == (idx, w)  # full k: the very same tensors


def test_budget_goes_greedily_to_the_least_damage():
    damage = {0: [0.9, 0.4, 0.1, 0.0], 1: [0.2, 0.1, 0.05, 0.0], 2: [0.5, 0.3, 0.02, 0.0]}
    r = Routing(True, 1.0)
    # removals by marginal damage: layer 2 (0.02), layer 1 (0.05), layer 1 (0.05), layer 0 (0.1), layer 1 (0.1)
    assert ActiveExperts.choose(0.75, damage, 4, r).k == {0: 4, 1: 2, 2: 3}
    assert ActiveExperts.choose(0.5, damage, 4, r).k == {0: 3, 1: 1, 2: 2}
    for f in (1.0, 0.875, 0.75, 0.5, 0.25):
        k = ActiveExperts.choose(f, damage, 4, r).k
        assert sum(k.values()) == int(f * 12) and min(k.values()) >= 1


def test_choice_is_cached_next_to_a_disk_store_and_deterministic(tiny_dir, tmp_path, monkeypatch):
    path = tiny_dir("qwen3_moe")
    store = tmp_path / "store"
    with OffloadedModel.from_pretrained(path, store_dir=store, cache_experts=4, active_experts=0.5) as m:
        first, damage = m.stats()["active_experts"], m.engine.active.damage
        assert m.stats()["hits"] + m.stats()["misses"] == 0  # choosing ran the model; the cache starts cold
    assert (store / CACHE).is_file()
    with OffloadedModel.from_pretrained(path, cache_experts=4, active_experts=0.5) as m:  # ram: measured again
        assert m.engine.active.damage == damage and m.stats()["active_experts"] == first

    def refuse(*a, **kw):
        raise AssertionError("measured again despite the cache")

    monkeypatch.setattr("offload.engine.active_experts.measure_damage", refuse)
    with OffloadedModel.from_pretrained(path, store_dir=store, cache_experts=4, active_experts=0.5) as m:
        assert m.stats()["active_experts"] == first
        assert ("active experts (LExI)", m.engine.active.describe()) in m.plan.rows()


# --- bad input ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [0, 1.5, -0.25, True, "0.5"])
def test_bad_fraction_is_refused(value):
    with pytest.raises(OffloadError, match=r"active_experts must be a fraction of the top-k in \(0, 1\]"):
        OffloadConfig(active_experts=value)


def test_llama4_and_too_small_a_fraction_are_refused(tiny_dir):
    with pytest.raises(OffloadError, match="not supported for Llama-4"):
        OffloadedModel.from_pretrained(tiny_dir("llama4_text"), active_experts=0.5)
    with pytest.raises(OffloadError, match=r"give active_experts=0.5 or more"):
        OffloadedModel.from_pretrained(tiny_dir("mixtral"), active_experts=0.4)


@pytest.mark.parametrize("tool", ["offload-chat", "offload-bench run"])
@pytest.mark.parametrize("value, message", [("1.5", "--active-experts 0.75"), ("0.3", "give --active-experts 0.5")])
def test_cli_rejects_bad_values_with_exit_2(tiny_dir, tool, value, message):
    from offload.bench.app import app
    from offload.cli.chat import chat_app

    path = str(tiny_dir("mixtral"))
    args = ([path, "--prompt", "w1"] if tool == "offload-chat" else ["run", path, "--repeats", "1"])
    r = CliRunner().invoke(chat_app if tool == "offload-chat" else app, args + ["--active-experts", value])
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output and "active_experts=" not in r.output, r.output
