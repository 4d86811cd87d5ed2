"""offload-bench predictors / prefetch (offload/bench/predictors.py, offload/bench/prefetch.py) and lossless prefetch on the disk tier."""
from __future__ import annotations

import json

import pytest
import torch
import typer
from typer.testing import CliRunner

from offload import OffloadedModel
from offload.bench import predictors as bench_predictors, prefetch as bench_prefetch

runner = CliRunner()


@pytest.fixture(scope="module")
def app():
    a = typer.Typer()
    a.command("noop")(lambda: None)  # two commands, so typer keeps subcommand names
    bench_predictors.register(a)
    bench_prefetch.register(a)
    return a


def test_predictors_json(app, tiny_dir, tmp_path):
    js = tmp_path / "pred.json"
    r = runner.invoke(app, ["predictors", str(tiny_dir("mixtral")), "--max-new-tokens", "4", "--lookahead", "0,1,2",
                            "--prompt", "w1 w2 w3 w4", "--prompt", "w5 w6 w7", "--json", str(js)])
    assert r.exit_code == 0, r.output
    res = json.loads(js.read_text())
    assert res["decode_steps"] == 2 * 3 and res["width"] == res["top_k"] == 2
    assert set(res["rows"]) == {"gate", "previous", "frequency", "oracle"}
    for name, by_d in res["rows"].items():
        assert set(by_d) == {"0", "1", "2"}, name
        for d, x in by_d.items():
            dec = x["decode"]
            assert dec["updates"] > 0
            recalls = [dec["recall"], x["prefill"]["recall"], *dec["per_layer"].values(), *dec["per_distance"].values()]
            assert all(0.0 <= v <= 1.0 for v in recalls), (name, d, recalls)
            assert set(dec["per_distance"]) == ({"0"} if d == "0" else {str(i) for i in range(1, int(d) + 1)})
    for x in res["rows"]["oracle"].values():
        assert x["decode"]["recall"] == 1.0 and x["prefill"]["recall"] == 1.0
        assert all(v == 1.0 for v in x["decode"]["per_layer"].values())
    assert "recall@2" in r.output


def test_predictors_bad_input_is_one_line(app, tiny_dir):
    r = runner.invoke(app, ["predictors", str(tiny_dir("mixtral")), "--lookahead", "9"])
    assert r.exit_code == 2 and "Traceback" not in r.output
    r = runner.invoke(app, ["predictors", str(tiny_dir("mixtral")), "--predictor", "nope"])
    assert r.exit_code == 2 and "unknown predictor" in r.output


def test_prefetch_smoke(app, tiny_dir, tmp_path):
    js = tmp_path / "pf.json"
    r = runner.invoke(app, ["prefetch", str(tiny_dir("mixtral")), "--store-dir", str(tmp_path / "s"), "--cache-experts",
                            "25%", "--predictor", "none,gate", "--lookahead", "0,1", "--min-precision", "0.5,1",
                            "--max-new-tokens", "2", "--repeats", "2", "--json", str(js)])
    assert r.exit_code == 0, r.output
    res = json.loads(js.read_text())
    rows = res["rows"]
    assert [x["config"] for x in rows] == ["all resident", "25% (6) none", "25% (6) none again (control)",
                                           "25% (6) gate d=0 p>=0.5", "25% (6) gate d=0 p>=1",
                                           "25% (6) gate d=1 p>=0.5", "25% (6) gate d=1 p>=1"]
    assert [x["predictor"] for x in rows] == ["none", "none", "control"] + ["gate"] * 4
    assert [x.get("prefetch_min_precision") for x in rows[3:]] == [0.5, 1.0, 0.5, 1.0]
    assert res["direct_io"] is True  # pytest's tmp is a local filesystem with O_DIRECT
    assert rows[1]["vs_no_prefetch"] == 1.0 and all(x["tok_s"] > 0 for x in rows)
    # 'vs no prefetch' is the median of per-round ratios against the same round's no-prefetch run
    for x in rows[2:]:
        per_round = [a / b for a, b in zip(x["samples_tok_s"], rows[1]["samples_tok_s"])]
        assert x["vs_no_prefetch"] == pytest.approx(sum(per_round) / 2)
        assert x["vs_no_prefetch_iqr"] == pytest.approx([min(per_round) * 0.75 + max(per_round) * 0.25,
                                                         min(per_round) * 0.25 + max(per_round) * 0.75])
        assert x["faster_rounds"] == sum(q > 1 for q in per_round)
    r = runner.invoke(app, ["prefetch", str(tiny_dir("mixtral")), "--store-dir", str(tmp_path / "s"),
                            "--min-precision", "half"])
    assert r.exit_code == 2 and "--min-precision takes numbers" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["prefetch", str(tiny_dir("mixtral")), "--store-dir", str(tmp_path / "s"),
                            "--predictor", "none,nope"])
    assert r.exit_code == 2 and "unknown predictor(s) ['nope']" in r.output and "oracle" in r.output


def test_prefetch_oracle_rows_replay_the_recorded_routing(app, tiny_dir, tmp_path):
    """`--predictor oracle` prefetches the routing recorded for the same greedy decode: at lookahead 0 every
    expert it fetches is used (the measured ceiling of prefetch), and it names which rows it is."""
    js = tmp_path / "pf.json"
    r = runner.invoke(app, ["prefetch", str(tiny_dir("mixtral")), "--store-dir", str(tmp_path / "s"), "--cache-experts",
                            "50%", "--predictor", "none,oracle", "--lookahead", "0,1", "--max-new-tokens", "6",
                            "--repeats", "2", "--json", str(js)])
    assert r.exit_code == 0, r.output
    rows = json.loads(js.read_text())["rows"]
    assert [x["config"] for x in rows] == ["all resident", "50% (12) none", "50% (12) none again (control)",
                                           "50% (12) oracle d=0", "50% (12) oracle d=1"]
    assert [x["predictor"] for x in rows] == ["none", "none", "control", "oracle", "oracle"]
    d0 = rows[3]
    assert d0["prefetch_issued"] > 0 and d0["prefetch_useful"] == d0["prefetch_issued"], d0
    assert d0["hit_rate"] > rows[1]["hit_rate"]


@pytest.mark.parametrize("predictor", ["gate", "previous", "frequency"])
def test_prefetch_is_lossless_on_the_disk_tier(predictor, tiny_dir, tmp_path):
    """Every predictor, lookahead 0, 1 and 2, a cache of 8 of 24 experts, disk store: same tokens as no prefetch."""
    path = tiny_dir("qwen3_moe")
    ids = torch.randint(3, 90, (1, 8), generator=torch.Generator().manual_seed(11))
    kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False)
    opts = dict(store="disk", store_dir=tmp_path / "s", cache_experts=8)
    with OffloadedModel.from_pretrained(path, **opts) as base:
        want = base.generate(ids, **kw)
    for d in (0, 1, 2):
        with OffloadedModel.from_pretrained(path, predictor=predictor, lookahead=d, **opts) as m:
            assert torch.equal(m.generate(ids, **kw), want), f"{predictor} lookahead {d}"
            s = m.stats()
            assert s["hits"] + s["misses"] == (want.shape[1] - 1) * 3 * 2
            # `previous` names last token's experts: still resident under LRU, or (when the cache is smaller
            # than one token's experts) only displaceable by evicting recent ones, which prefetch never does
            assert (s["prefetch_issued"] > 0) == (predictor != "previous"), s
