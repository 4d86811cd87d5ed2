"""predictors/: the cross-layer gate on tiny real transformers models, the history baselines, the metrics."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from predictors.base import column_score, rank_by_count
from predictors import (PREDICTORS, FrequencyPredictor, GatePredictor, NullPredictor, OraclePredictor, Predictor,
                        PredictorScore, PreviousPredictor, find_routers, make_predictor, precision, recall_at_k,
                        useful_prefetch_rate)

ROOT = Path(__file__).resolve().parents[2]
torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------------- tiny models
def tiny_model(arch: str, **overrides):
    """A randomly initialised tiny `arch` model in eval mode, with routing made non-trivial."""
    import transformers as tf
    from tiny_models import COMMON, TINY

    cfg_name, model_name, kwargs = TINY[arch]
    cfg = getattr(tf, cfg_name)(**{**COMMON, **kwargs, **overrides})
    torch.manual_seed(0)
    model = getattr(tf, model_name)(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gate" in name or "router" in name:
                p.normal_(0, 0.2)
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:  # DeepSeek-V3: the bias must change the choice
                b.normal_(0, 0.5)
    return model


def run_capture(model, routers, seq_len: int = 7):
    """Forward once; per MoE layer the router input [T, H] and the experts it selected ([T, k] ids)."""
    ins, sel = {}, {}

    def pre(layer):
        def f(mod, args):
            ins[layer] = args[0].detach().reshape(-1, args[0].shape[-1]).clone()
        return f

    def post(layer):
        def f(mod, args, out):
            if len(out) == 3:
                sel[layer] = out[2].detach().clone()
            else:  # Llama-4: (dense scores, logits); selected = non-zero scores
                k = mod.top_k
                sel[layer] = torch.stack([row.nonzero().flatten()[:k] for row in out[0]])
                assert all(int((row > 0).sum()) == k for row in out[0])
        return f

    handles = [h for i, r in routers.items()
               for h in (r.register_forward_pre_hook(pre(i)), r.register_forward_hook(post(i)))]
    ids = torch.randint(3, model.config.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    return ins, sel


def dims(routers):
    r = next(iter(routers.values()))
    return r.weight.shape[0], r.top_k


ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "phimoe", "granitemoe",
         "gpt_oss", "llama4_text"]
DENSE_FIRST = {"deepseek_v2": 1, "deepseek_v3": 1}


@pytest.fixture(scope="module", params=ARCHS)
def captured(request):
    model = tiny_model(request.param)
    routers = find_routers(model)
    ins, sel = run_capture(model, routers)
    return request.param, model, routers, ins, sel


def test_find_routers_finds_each_moe_layer(captured):
    arch, model, routers, ins, sel = captured
    n = model.config.num_hidden_layers
    assert list(routers) == list(range(DENSE_FIRST.get(arch, 0), n))
    assert set(ins) == set(sel) == set(routers)


def test_gate_route_is_the_routers_own_selection(captured):
    """Given the true router input of a layer, route() returns exactly what the model's router chose."""
    arch, model, routers, ins, sel = captured
    E, k = dims(routers)
    gp = GatePredictor(routers, list(routers), E, k)
    for layer in routers:
        index, logits = gp.route(layer, ins[layer])
        assert index.shape == sel[layer].shape == (ins[layer].shape[0], k)
        assert logits.shape == (ins[layer].shape[0], E)
        assert torch.equal(index.sort(-1).values, sel[layer].long().sort(-1).values), arch


def test_gate_predict_equals_actual_selection_given_true_input(captured):
    """predict(l, true input of l+1): the selected experts of l+1 lead the list, exactly (prefill and decode)."""
    arch, model, routers, ins, sel = captured
    E, k = dims(routers)
    layers = list(routers)
    gp = GatePredictor(routers, layers, E, k, width=k + 2)
    for prev, nxt in zip(layers, layers[1:]):
        # decode: one token; the first k ids are the router's top-k for it, then 2 more by logit
        for t in range(ins[nxt].shape[0]):
            pred = gp.predict(prev, ins[nxt][t:t + 1])
            assert list(pred) == [nxt]
            assert len(pred[nxt]) == k + 2 and len(set(pred[nxt])) == k + 2
            assert set(pred[nxt][:k]) == set(sel[nxt][t].tolist()), (arch, nxt, t)
        # prefill: all tokens; the union of their selections leads, ranked by how many tokens chose each
        pred = gp.predict(prev, ins[nxt])[nxt]
        union = set(sel[nxt].flatten().tolist())
        assert set(pred[:len(union)]) == union
        assert len(pred) == max(len(union), k + 2)
        counts = [int((sel[nxt] == e).sum()) for e in pred[:len(union)]]
        assert counts == sorted(counts, reverse=True)


def test_gate_wide_decode_short_path_equals_full_ranking(captured):
    """Decode with width > k: routers predicted from their logits rank by top-`width` logits; that must be the
    same list as the full ranking through the router's forward (selected by logit, then the rest by logit)."""
    arch, model, routers, ins, sel = captured
    E, k = dims(routers)
    layers = list(routers)
    fast = GatePredictor(routers, layers, E, k, width=min(E, k + 2))
    full = GatePredictor(routers, layers, E, k, width=min(E, k + 2))
    full._logit_topk = dict.fromkeys(layers)  # every router through its forward
    for prev, nxt in zip(layers, layers[1:]):
        if not fast.logit_topk(nxt):
            continue
        for t in range(ins[nxt].shape[0]):
            h = ins[nxt][t:t + 1]
            logits = full.route(nxt, h)[1].float().reshape(-1)
            if logits.unique().numel() < E:  # a tie may be broken either way
                continue
            assert fast.predict(prev, h) == full.predict(prev, h), (arch, nxt, t)


def test_gate_cross_layer_shapes(captured):
    """The real use: layer l's own input predicts l+1..l+d; check the shape of the answer only."""
    arch, model, routers, ins, sel = captured
    E, k = dims(routers)
    layers = list(routers)
    gp = GatePredictor(routers, layers, E, k, lookahead=2)
    for i, layer in enumerate(layers):
        pred = gp.predict(layer, ins[layer][-1:])
        assert list(pred) == layers[i + 1:i + 3]
        for ids in pred.values():
            assert len(ids) == k and len(set(ids)) == k and all(0 <= e < E for e in ids)
            assert all(isinstance(e, int) for e in ids)
    assert gp.predict(layers[-1], ins[layers[-1]]) == {}


def test_gate_does_not_fire_router_hooks(captured):
    """Predictions call router.forward directly: output_router_logits recorders and tracers see nothing."""
    arch, model, routers, ins, sel = captured
    E, k = dims(routers)
    calls = []
    handles = [r.register_forward_hook(lambda m, a, o: calls.append(1)) for r in routers.values()]
    try:
        GatePredictor(routers, list(routers), E, k, lookahead=3).predict(min(routers), ins[min(routers)])
    finally:
        for h in handles:
            h.remove()
    assert calls == []


def test_gate_skips_dense_layers_and_validates():
    model = tiny_model("qwen2_moe", num_hidden_layers=4, mlp_only_layers=[1])
    routers = find_routers(model)
    assert list(routers) == [0, 2, 3]
    h = torch.randn(3, model.config.hidden_size)
    gp = GatePredictor(routers, [0, 2, 3], 8, 2, lookahead=2)
    assert list(gp.predict(0, h)) == [2, 3]
    assert list(gp.predict(1, h)) == [2, 3]  # a dense layer: the next MoE layers all the same
    assert list(gp.predict(2, h)) == [3]
    with pytest.raises(ValueError, match="non-MoE"):
        GatePredictor(routers, [0, 3], 8, 2)
    with pytest.raises(ValueError, match="width"):
        GatePredictor(routers, [0, 2, 3], 8, 2, width=1)
    with pytest.raises(ValueError, match="lookahead"):
        GatePredictor(routers, [0, 2, 3], 8, 2, lookahead=-1)


def test_lookahead_zero_predicts_the_layer_itself_with_its_own_router():
    model = tiny_model("qwen2_moe", num_hidden_layers=4, mlp_only_layers=[1])
    routers = find_routers(model)
    h = torch.randn(1, 1, model.config.hidden_size)  # the residual stream entering a layer: [B, T, H]
    gp = GatePredictor(routers, [0, 2, 3], 8, 2, lookahead=0)
    assert gp.entry and gp.targets(2) == [2] and gp.targets(1) == []
    assert gp.predict(1, h) == {}
    for layer in (0, 2, 3):
        want = routers[layer].forward(h.reshape(1, -1))[2][0].tolist()
        assert gp.predict(layer, h) == {layer: want}
    assert not GatePredictor(routers, [0, 2, 3], 8, 2, lookahead=1).entry


def test_lookahead_zero_adds_the_last_attention_output_and_keeps_the_better_guess(captured):
    """At lookahead 0 the gate guesses twice, from the entry stream alone and with the last token's attention
    output added, and answers with the guess that has been right more often at that layer (a tie: attention)."""
    arch, model, routers, ins, sel = captured
    E, k = dims(routers)
    for width in (k, k + 2):  # the router's own order, and the wide ranking (short path or full forward)
        gp = GatePredictor(routers, list(routers), E, k, lookahead=0, width=width)
        for layer in routers:
            x, chosen = ins[layer], sel[layer].long()
            overlap = lambda ab: len(set(chosen[ab[0]].tolist()) & set(chosen[ab[1]].tolist()))  # noqa: E731
            a, b = min(((a, b) for a in range(len(x)) for b in range(len(x))), key=overlap)
            assert overlap((a, b)) < k
            plain = gp.predict(layer, x[a:a + 1])[layer]            # no attention output seen yet
            assert set(plain[:k]) == set(chosen[a].tolist()), arch
            gp.attended(layer, (x[b:b + 1] - x[a:a + 1]).reshape(1, 1, -1))
            with_attention = gp.predict(layer, x[a:a + 1])[layer]   # stream + attention = token b's input
            assert set(with_attention[:k]) == set(chosen[b].tolist()), arch
            assert len(with_attention) == width
            for _ in range(2):                                      # twice the plain guess is the right one
                gp.observe(layer, chosen[a:a + 1])
                assert gp.predict(layer, x[a:a + 1])[layer] == plain
            gp.observe(layer, chosen[b:b + 1])                      # once attention: plain is still ahead
            assert gp.predict(layer, x[a:a + 1])[layer] == plain
            gp.observe(layer, chosen[b:b + 1])                      # twice: attention is ahead
            assert gp.predict(layer, x[a:a + 1])[layer] == with_attention
        gp.reset()  # a new sequence: no attention output to add
        layer = next(iter(routers))
        assert set(gp.predict(layer, ins[layer][:1])[layer][:k]) == set(sel[layer][0].tolist())


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3", "gpt_oss", "llama4_text"])
def test_gate_route_exact_in_bfloat16(arch):
    model = tiny_model(arch).to(torch.bfloat16)
    routers = find_routers(model)
    ins, sel = run_capture(model, routers)
    E, k = dims(routers)
    gp = GatePredictor(routers, list(routers), E, k)
    for layer in routers:
        assert torch.equal(gp.route(layer, ins[layer])[0].sort(-1).values, sel[layer].long().sort(-1).values)


def test_gate_takes_the_logit_top_k_path_only_where_the_router_agrees(captured):
    """Plain top-k routers are predicted from their logits; DeepSeek-V3's bias-steered, group-limited router is
    not (its choice is not the top-k of its logits). Either way route() is the router's selection (above)."""
    arch, model, routers, ins, sel = captured
    E, k = dims(routers)
    gp = GatePredictor(routers, list(routers), E, k)
    want = arch != "deepseek_v3"
    assert [gp.logit_topk(layer) for layer in routers] == [want] * len(routers), arch
    for layer in routers:
        index, logits = gp.route(layer, ins[layer])
        assert torch.equal(index.sort(-1).values, sel[layer].long().sort(-1).values), arch


class DenseRouter(torch.nn.Module):
    """Llama-4 shaped output (dense scores, logits), with a selected score that underflowed to 0."""
    top_k = 2

    def forward(self, h):
        logits = torch.tensor([[-30.0, 1.0, -40.0, -50.0]]).expand(h.shape[0], 4)
        scores = torch.tensor([[0.0, 0.7, 0.0, 0.0]]).expand(h.shape[0], 4)  # expert 0 selected, score 0
        return scores, logits


def test_gate_dense_scores_underflow_and_bad_router():
    gp = GatePredictor({0: DenseRouter(), 1: DenseRouter()}, [0, 1], 4, 2, width=3)
    assert gp.route(1, torch.zeros(2, 8))[0].tolist() == [[1, 0], [1, 0]]
    assert gp.predict(0, torch.zeros(1, 8)) == {1: [1, 0, 2]}

    class Bad(torch.nn.Module):
        def forward(self, h):
            return h

    with pytest.raises(TypeError, match="Bad"):
        GatePredictor({0: Bad(), 1: Bad()}, [0, 1], 4, 2).predict(0, torch.zeros(1, 8))


# ----------------------------------------------------------------------------------------------- history
def test_previous_known_answer():
    p = PreviousPredictor([0, 2, 5], num_experts=8, top_k=2, lookahead=2)
    h = torch.zeros(1, 4)
    assert p.predict(0, h) == {}
    p.observe(0, torch.tensor([[1, 3]]))
    p.observe(2, torch.tensor([[4, 6]]))
    p.observe(5, torch.tensor([[7, 8]]))  # 8 = padding
    assert p.predict(0, h) == {2: [4, 6], 5: [7]}
    assert p.predict(2, h) == {5: [7]}
    assert p.predict(5, h) == {}
    p.observe(2, torch.tensor([[5, 0], [0, 1], [2, 0]]))  # prefill-like: 0 three times, then once each:
    assert p.predict(0, h)[2] == [0, 2, 5, 1]             # 2 and 5 (column 0, lower id first) before 1
    p.reset()
    assert p.predict(0, h) == {}


def test_frequency_known_answer():
    p = FrequencyPredictor([0, 1, 2], num_experts=6, top_k=2, width=3)
    h = torch.zeros(1, 4)
    for e in ([[5, 1]], [[5, 2]], [[3, 5]], [[1, 6]]):  # 6 = padding
        p.observe(1, torch.tensor(e))
    assert p.predict(0, h) == {1: [5, 1, 2]}  # 5 x3, 1 x2, then 2 and 3 once each: lower id first
    assert p.predict(1, h) == {}  # layer 2 never observed
    p.observe(2, torch.tensor([[4, 0]]))
    assert p.predict(1, h) == {2: [0, 4]}  # only used experts
    p.reset()
    assert p.predict(0, h) == {}
    keep = FrequencyPredictor([0, 1], 6, 2, keep_across_sequences=True)
    keep.observe(1, torch.tensor([[2, 3]]))
    keep.reset()
    assert keep.predict(0, h) == {1: [2, 3]}


def test_oracle_known_answer():
    # 3 tokens, moe layers [1, 3, 4], top-2
    trace = np.array([[[0, 1], [2, 3], [4, 5]],
                      [[1, 2], [3, 4], [5, 9]],   # 9 = padding (E = 8)
                      [[7, 6], [3, 0], [6, 5]]])
    p = OraclePredictor(trace, [1, 3, 4], num_experts=8, top_k=2, lookahead=2)
    one = torch.zeros(1, 4)
    assert p.predict(1, one) == {3: [2, 3], 4: [4, 5]}
    p.observe(1, torch.tensor([[0, 1]]))
    assert p.predict(3, one) == {4: [4, 5]}  # no advance before the last MoE layer
    p.observe(3, torch.tensor([[2, 3]]))
    p.observe(4, torch.tensor([[4, 5]]))
    assert p.pos == 1
    assert p.predict(1, one) == {3: [3, 4], 4: [5]}
    assert p.predict(4, one) == {}
    two = torch.zeros(2, 4)  # a 2-token forward: rows 1 and 2, by count
    assert p.predict(1, two) == {3: [3, 0, 4], 4: [5, 6]}  # ties: same column -> lower id
    p.observe(4, torch.zeros(2, 2, dtype=torch.long))
    assert p.pos == 3 and p.predict(1, one) == {}  # past the end
    p.reset()
    assert p.predict(3, one) == {4: [4, 5]}
    p.seek(2)
    assert p.predict(1, one) == {3: [3, 0], 4: [6, 5]}  # the trace's column order
    with pytest.raises(ValueError, match="trace"):
        OraclePredictor(trace, [1, 3], 8, 2)
    assert OraclePredictor(torch.as_tensor(trace), [1, 3, 4], 8).top_k == 2
    # one-token answers (plain Python) rank as the general path does, repeated ids and padding included
    g = torch.Generator().manual_seed(0)
    rnd = torch.randint(-1, 9, (50, 3, 3), generator=g)
    p = OraclePredictor(rnd, [1, 3, 4], num_experts=8, lookahead=2)
    for step in range(50):
        p.seek(step)
        want = {t: rank_by_count(rnd[step, i:i + 1], 8, column_score(rnd[step, i:i + 1], 8))
                for i, t in ((1, 3), (2, 4))}
        assert p.predict(1, one) == {t: r for t, r in want.items() if r}, step


def test_registry_and_protocol():
    assert set(PREDICTORS) == {"none", "gate", "previous", "frequency", "oracle"}
    kw = dict(moe_layers=[0, 1], num_experts=4, top_k=2, routers={}, trace=np.zeros((2, 2, 2), int))
    for name in PREDICTORS:
        p = make_predictor(name, **kw)  # context a predictor does not take is dropped
        assert isinstance(p, Predictor) and p.name == name
        assert isinstance(p.predict(0, torch.zeros(1, 8)), dict)
    assert isinstance(make_predictor("none", **kw), NullPredictor)
    with pytest.raises(ValueError, match="'frequency'.*'gate'"):
        make_predictor("nope", **kw)
    with pytest.raises(TypeError, match="lookahed"):
        make_predictor("previous", lookahed=2, **kw)


# ----------------------------------------------------------------------------------------------- metrics
def test_metrics_known_answers():
    assert recall_at_k([1, 2, 3, 4], {2, 4, 7}, 2) == pytest.approx(1 / 3)
    assert recall_at_k([1, 2, 3, 4], [2, 4, 7], 4) == pytest.approx(2 / 3)
    assert recall_at_k([1, 1, 2], [1, 2], 2) == 1.0  # duplicates count once
    assert recall_at_k([], [1], 3) == 0.0 and recall_at_k([1], [], 3) == 1.0
    assert recall_at_k(torch.tensor([3, 1]), torch.tensor([[1, 3]]), 2) == 1.0
    assert precision([1, 2, 3, 4], [2, 4, 7]) == 0.5
    assert precision([1, 2, 3, 4], [2, 4, 7], k=2) == 0.5
    assert precision([], [1]) == 1.0
    assert useful_prefetch_rate([(0, 1), (0, 2), (1, 3), (1, 3)], [(0, 2), (1, 3), (2, 0)]) == pytest.approx(2 / 3)
    assert useful_prefetch_rate([], [(0, 1)]) == 1.0


def test_predictor_score():
    s = PredictorScore(k=2, num_experts=8)
    assert s.recall() == 0.0
    assert s.update(1, [1, 2, 3], [2, 3]) == 0.5            # only [1, 2] scored
    assert s.update(1, [5, 6], torch.tensor([[5, 6]])) == 1.0
    assert s.update(2, [0, 1], [1, 8]) == 1.0               # 8 = padding
    assert s.recall(1) == pytest.approx(3 / 4) and s.recall(2) == 1.0
    assert s.recall() == pytest.approx(4 / 5)
    assert s.precision() == pytest.approx(4 / 6)
    assert s.per_layer() == {1: pytest.approx(0.75), 2: 1.0}
    s.update_all({3: [4], 4: [1]}, {3: [4, 5]})             # layer 4 has no actual: skipped
    assert s.summary()["updates"] == 4 and s.recall(3) == 0.5 and 4 not in s.actual
    s.reset()
    assert s.summary() == {"recall": 0.0, "precision": 0.0, "updates": 0, "per_layer_recall": {}}


# ----------------------------------------------------------------------------------------------- imports
def test_predictors_never_import_offload_or_cache():
    code = ("import sys, predictors, predictors.gate, predictors.history, predictors.metrics\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('offload', 'cache'))\n"
            "assert not bad, bad\n"
            "print(predictors.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).resolve().parent == ROOT / "predictors"
