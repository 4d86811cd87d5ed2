"""offload-bench and the cost model: simulator == engine, known answers, CLI runs, bad input."""
from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from cache import Trace
from cache.simulate import replay
from offload.bench import costmodel as cm
from offload.bench.app import app
from offload.model import OffloadedModel

runner = CliRunner()


# --- reference equivalence: the simulator reproduces the engine ------------------------------------
@pytest.mark.parametrize("policy", ["lru", "lfu", "lfru", "score", "layer_quota"])
def test_batched_replay_reproduces_engine_hits_and_misses(tiny_dir, tmp_path, policy):
    path = tiny_dir("mixtral")
    for capacity in (3, 7):
        m = OffloadedModel.from_pretrained(path, cache_experts=capacity, policy=policy, trace=True)
        for prompt in ([[1, 5, 9, 14, 20, 33, 40]], [[2, 3, 4]]):  # two prefills, each one engine step
            m.generate(torch.tensor(prompt), max_new_tokens=5, do_sample=False, pad_token_id=0)
        stats, trace = m.stats(), m.trace()
        m.close()
        trace.save(tmp_path / "t.npz")
        trace = Trace.load(tmp_path / "t.npz")  # the step grouping survives the .npz
        assert trace.step_spans()[0] == (0, 7) and len(trace.step_spans()) == 2 * 5
        sim = replay(trace, policy, capacity, batched_prefill=True)
        assert (sim.hits, sim.misses) == (stats["hits"], stats["misses"]), (policy, capacity)


def test_batched_steps_merge_a_prefill_in_ascending_id_order():
    experts = [[[3, 1]], [[1, 0]], [[2, 3]]]
    trace = Trace(torch.tensor(experts).numpy(), torch.ones(3, 1, 2).numpy() / 2, num_experts=4,
                  prompt_boundaries=[0], prefill_tokens=[2])
    steps = list(trace.steps(batched=True))
    assert [s[0] for s in steps] == [0, 2]
    assert steps[0][2] == [((0, 0), 1, 0.5), ((0, 1), 2, 1.0), ((0, 3), 1, 0.5)]
    r = replay(trace, "lru", 3, batched_prefill=True)
    assert (r.hits, r.misses) == (2, 4)  # prefill: 3 misses + 1 repeat hit; decode: 3 hits, 2 misses


# --- known answers: the cost model against docs/background.md --------------------------------------
def test_expert_sizes_and_bytes_per_token_match_the_background_doc():
    mix, qwen, oss = cm.preset("Mixtral-8x7B"), cm.preset("Qwen3-235B-A22B"), cm.preset("gpt-oss-120b")
    assert cm.expert_bytes(mix, 4) / 1e6 == pytest.approx(90.8, abs=0.1)
    assert cm.expert_bytes(qwen, 4) / 1e6 == pytest.approx(9.7, abs=0.05)
    assert cm.expert_bytes(oss, "mxfp4") / 1e6 == pytest.approx(13.2, abs=0.05)
    assert qwen.active_experts == 752
    link = cm.MACHINES["rtx4090"].link_bw  # 24 GB/s pinned
    for shape, tok_s in ((mix, 4.3), (qwen, 3.4)):
        for h, scale in ((0.0, 1), (0.9, 10), (0.95, 20)):
            assert link / cm.bytes_per_token(shape, h, 4) == pytest.approx(tok_s * scale, rel=0.10)
    p = cm.project(mix, cm.MACHINES["rtx4090"], 0.0, 4)
    assert p.stream_tok_s == pytest.approx(4.3, rel=0.10)  # compute time is small next to the link


def test_hybrid_sends_each_missed_byte_down_the_faster_path():
    """miss='auto' keeps the dynamic hit rate and picks link or CPU per miss: never below either pure design at
    the same hit rate; a slow measured CPU makes the CPU design (not the stream) lose."""
    mix, m = cm.preset("Mixtral-8x7B"), cm.MACHINES["rtx4090"]
    for h in (0.0, 0.5, 0.9):
        p = cm.project(mix, m, h, 4)
        assert p.hybrid_tok_s == pytest.approx(max(p.stream_tok_s, p.cpu_tok_s))
        slow = cm.project(mix, m, h, 4, cpu_bw=m.link_bw / 4)
        assert slow.cpu_tok_s < slow.stream_tok_s == pytest.approx(slow.hybrid_tok_s)
        assert slow.stream_tok_s == pytest.approx(p.stream_tok_s)


def test_what_fits_on_a_24gb_card_matches_the_background_doc():
    m = cm.MACHINES["rtx4090"]
    for name, share in (("Mixtral-8x7B", 0.76), ("gpt-oss-120b", 0.28), ("Mixtral-8x22B", 0.26),
                        ("Qwen3-235B-A22B", 0.14), ("DeepSeek-V3", 0.04)):
        assert cm.fit(cm.preset(name), m, 4).fraction == pytest.approx(share, abs=0.01), name
    assert cm.crossover_hit_rate(m) == pytest.approx(0.64, abs=0.03)


def test_shape_from_config_matches_the_preset():
    cfg = dict(num_hidden_layers=32, hidden_size=4096, num_local_experts=8, num_experts_per_tok=2,
               intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, vocab_size=32000)
    s = cm.ModelShape.from_config(cfg)
    ref = cm.preset("mixtral-8x7b")
    assert (s.moe_layers, s.experts, s.top_k, s.expert_params) == (32, 8, 2, ref.expert_params)
    assert s.non_expert_params == pytest.approx(ref.non_expert_params, rel=0.02)
    with pytest.raises(ValueError, match="not a Mixture-of-Experts"):
        cm.ModelShape.from_config(dict(num_hidden_layers=2, hidden_size=8, num_attention_heads=2))


def test_measure_local_is_a_positive_profile():
    local = cm.measure_local(seconds=0.05)
    assert local.link_bw > 1e8 and local.gpu_bw > 1e8
    assert cm.cpu_engine_tok_s(cm.preset("Mixtral-8x7B"), local, 0.5) > 0


def test_local_engine_model_known_answers():
    """The calibrated CPU-engine model, term by term, on a synthetic profile (no timing)."""
    cfg = {"model_type": "mixtral", "num_hidden_layers": 4, "hidden_size": 1000, "intermediate_size": 500,
           "num_local_experts": 8, "num_experts_per_tok": 2, "num_attention_heads": 10, "num_key_value_heads": 5,
           "vocab_size": 2000, "tie_word_embeddings": False}
    shape = cm.ModelShape.from_config(cfg)
    assert shape.vocab == 2000 and shape.read_params_per_token == shape.non_expert_params - 2000 * 1000
    prof = cm.LocalProfile(gemv_bw={"bf16": 1e9, "int8": 2e9}, store_bw={"ram": 0.5e9}, token_s=1e-3,
                           layer_s=1e-4, expert_s=1e-5, load_s=2e-5)
    e_bytes = 3 * 1000 * 500 * 2                              # one bf16 expert
    gemv = (shape.read_params_per_token * 2 + 8 * e_bytes) / 1e9  # 4 layers x top-2 = 8 active experts
    base = 1e-3 + gemv + 4 * 1e-4 + 8 * 1e-5
    assert cm.local_decode_seconds(shape, prof, 1.0) == pytest.approx(base)
    miss = 8 * 0.25 * (e_bytes / 0.5e9 + 2e-5)                  # h = 0.75: 2 misses per token
    assert cm.local_decode_seconds(shape, prof, 0.75) == pytest.approx(base + miss)
    assert cm.local_decode_seconds(shape, prof, 0.75, record_bytes=1e6) == pytest.approx(
        base + 2 * (1e6 / 0.5e9 + 2e-5))
    assert cm.local_tok_s(shape, prof, 1.0) == pytest.approx(1 / base)
    int8 = cm.local_decode_seconds(shape, prof, 1.0, fmt="int8")  # experts at 1 byte/weight, twice the bandwidth
    assert int8 == pytest.approx(base - 8 * e_bytes / 1e9 + 8 * (e_bytes / 2) / 2e9)
    # with the model's config and per-shape GEMV times, GEMVs cost their measured calls instead
    plan = cm.gemv_plan(cfg)
    assert {(n, k): c for r, n, k, c in plan if r == "expert"} == {(1000, 1000): 8, (1000, 500): 8}
    assert (2000, 1000, 1) == next((n, k, c) for r, n, k, c in plan if n == 2000)  # lm_head once
    timed = cm.LocalProfile(**{**vars(prof), "gemv_s": {(n, k): 1e-6 for _r, n, k, _c in plan}})
    calls = sum(c for *_x, c in plan)
    assert calls == 4 + 8 + 4 + 4 + 16 + 1                        # q, k+v, o, router, experts, lm_head
    assert cm.local_decode_seconds(shape, timed, 1.0, config=cfg) == pytest.approx(
        1e-3 + calls * 1e-6 + 4 * 1e-4 + 8 * 1e-5)
    with pytest.raises(ValueError, match="no calibration"):
        cm.local_decode_seconds(shape, prof, 1.0, fmt="int4")
    with pytest.raises(ValueError, match="hit rate"):
        cm.local_decode_seconds(shape, prof, 1.5)
    # more overhead or less bandwidth: slower; more hits: faster
    slower = cm.LocalProfile(**{**vars(prof), "layer_s": 2e-4, "store_bw": {"ram": 0.25e9}})
    assert cm.local_tok_s(shape, slower, 0.5) < cm.local_tok_s(shape, prof, 0.5) < cm.local_tok_s(shape, prof, 0.9)


def test_probes_keep_the_model_width_when_small_enough():
    """Calibration probes run at the model's own width when 5 layers of it are small, else at toy width."""
    small = {"model_type": "qwen3_moe", "num_hidden_layers": 4, "hidden_size": 256, "intermediate_size": 512,
             "moe_intermediate_size": 288, "num_experts": 16, "num_experts_per_tok": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 8192, "eos_token_id": 8000}
    big = {**small, "hidden_size": 4096, "moe_intermediate_size": 14336, "num_attention_heads": 32}
    assert cm._fits_real_width(small, 5) and not cm._fits_real_width(big, 5)
    real = cm._probe_config(small, 5, 1, real_width=True)
    assert (real["hidden_size"], real["moe_intermediate_size"], real["head_dim"]) == (256, 288, 64)
    assert (real["num_hidden_layers"], real["num_experts_per_tok"], real["vocab_size"]) == (5, 1, 512)
    assert real["eos_token_id"] is None  # outside the probe's vocab
    toy = cm._probe_config(small, 5, 1)
    assert (toy["hidden_size"], toy["moe_intermediate_size"], toy["vocab_size"]) == (64, 64, 512)


# --- CLI runs --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def recorded(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "trace.npz"
    r = runner.invoke(app, ["trace", str(tiny_dir("mixtral")), "--prompt", "w1 w2 w3 w4 w5", "--prompt", "w7 w8",
                            "--max-new-tokens", "6", "--out", str(out)])
    assert r.exit_code == 0, r.output
    return out


def test_trace_then_policies_json(recorded, tmp_path):
    tr = Trace.load(recorded)
    assert tr.tokens == 5 + 2 + 2 * 5 and tr.step_index is not None
    js = tmp_path / "p.json"
    r = runner.invoke(app, ["policies", str(recorded), "--cache-experts", "25%,50%", "--cache-experts", "12", "--json", str(js),
                            "--plot", str(tmp_path / "p.png")])
    assert r.exit_code == 0, r.output
    assert "best policy / belady" in r.output
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # matplotlib comes with [dev]
    res = json.loads(js.read_text())["policies"]
    uses = sum(1 for _ in tr.valid.reshape(-1) if _)
    assert set(res) >= {"lru", "lfu", "score", "belady"}
    for name, row in res.items():
        for label, cell in row.items():
            assert cell["hits"] + cell["misses"] == cell["uses"] == uses, (name, label)
            assert cell["hit_rate"] <= res["belady"][label]["hit_rate"] + 1e-12, (name, label)


def test_project_with_trace_and_given_hit_rates(recorded):
    r = runner.invoke(app, ["project", "--trace", str(recorded)])
    assert r.exit_code == 0, r.output
    assert "PROJECTION" in r.output and "mixtral-offloading" in r.output
    r = runner.invoke(app, ["project", "--hit-rate", "0,0.9", "--bits", "16", "--machine", "rtx3090"])
    assert r.exit_code == 0, r.output


def test_run_smoke(tiny_dir, tmp_path):
    js = tmp_path / "run.json"
    r = runner.invoke(app, ["run", str(tiny_dir("mixtral")), "--cache-experts", "25%,50%", "--max-new-tokens", "2",
                            "--repeats", "1", "--json", str(js)])
    assert r.exit_code == 0, r.output
    rows = json.loads(js.read_text())["rows"]
    assert len(rows) == 3 and rows[0]["config"] == "all resident" and rows[0]["hit_rate"] == 1.0
    assert all(r["tok_s"] > 0 and 0 <= r["hit_rate"] <= 1 for r in rows)


@pytest.mark.parametrize("args", [
    ["policies", "/nonexistent/trace.npz"],
    ["policies", "{trace}", "--cache-experts", "150%"],
    ["policies", "{trace}", "--cache-experts", "abc"],
    ["policies", "{trace}", "--cache-memory", "lots"],
    ["policies", "{trace}", "--cache-experts", "1"],
    ["project", "--machine", "nope"],
    ["project", "--hit-rate", "2"],
    ["project", "--bits", "5"],
    ["run", "/nonexistent/model"],
])
def test_bad_input_is_one_line_and_exit_2(recorded, args):
    r = runner.invoke(app, [a.replace("{trace}", str(recorded)) for a in args])
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output


@pytest.mark.parametrize("what", ["truncated", "not a zip", "a directory"])
def test_unreadable_trace_is_one_line(recorded, tmp_path, what):
    bad = tmp_path / "bad.npz"
    if what == "truncated":
        bad.write_bytes(recorded.read_bytes()[:200])
    elif what == "not a zip":
        bad.write_bytes(b"\x93NUMPY garbage")
    else:
        bad.mkdir()
    r = runner.invoke(app, ["policies", str(bad)])
    assert r.exit_code == 2, (r.output, r.exception)
    assert "bad.npz" in r.output and "offload-bench trace" in r.output


@pytest.mark.parametrize("what", ["a directory", "binary"])
def test_unreadable_prompts_file_is_one_line(tiny_dir, tmp_path, what):
    bad = tmp_path / "prompts.txt"
    if what == "binary":
        bad.write_bytes(b"\xff\xfe\x00\x81")
    else:
        bad.mkdir()
    r = runner.invoke(app, ["trace", str(tiny_dir("mixtral")), "--prompts", str(bad), "--out", str(tmp_path / "t.npz")])
    assert r.exit_code == 2, (r.output, r.exception)
    assert "prompts file" in r.output and "UTF-8" in r.output


def test_policies_take_the_chat_cache_vocabulary(recorded, tmp_path):
    """--cache-experts 25% (or 0.25), a slot count, and --cache-memory (bytes or a share) name the same caches."""
    tr = Trace.load(recorded)
    pool = tr.num_experts * len(tr.moe_layers)
    js = tmp_path / "p.json"
    r = runner.invoke(app, ["policies", str(recorded), "--cache-experts", "25%,0.5,12", "--cache-memory",
                            f"{12 * tr.expert_bytes}B,50%", "--json", str(js)])
    assert r.exit_code == 0, r.output
    lru = json.loads(js.read_text())["policies"]["lru"]
    assert list(lru) == ["25%", "50%", "12 slots", f"{12 * tr.expert_bytes}B", "mem 50%"]
    assert lru["25%"]["slots"] == round(pool / 4) and lru["50%"]["slots"] == lru["mem 50%"]["slots"] == pool // 2
    assert lru["12 slots"] == lru[f"{12 * tr.expert_bytes}B"]


def test_bench_h_version_and_defaults_in_help():
    from importlib.metadata import version

    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"moe-offload {version('moe-offload')}"
    for cmd in ("run", "prefetch", "policies", "formats", "trace", "project", "predictors", "peers"):
        r = runner.invoke(app, [cmd, "-h"], env={"COLUMNS": "300"})
        assert r.exit_code == 0, (cmd, r.output)
        if cmd in ("run", "prefetch", "policies"):
            assert "--cache-experts" in r.output and "--cache-memory" in r.output and "--capacity" not in r.output
            assert "[default: (25%,50%)]" in r.output or "[default: (10%,25%,50%,75%)]" in r.output
    r = runner.invoke(app, ["formats", "-h"], env={"COLUMNS": "300"})
    assert "--bits" in r.output and "--formats" not in r.output
