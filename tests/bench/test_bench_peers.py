"""offload-bench peers on a tiny checkpoint: every engine in its own subprocess, through typer's CliRunner."""
from __future__ import annotations

import importlib.util
import json

import typer
from typer.testing import CliRunner

from offload.bench import peers as bench_peers

runner = CliRunner()


def _app() -> typer.Typer:
    app = typer.Typer(add_completion=False)

    @app.command()
    def noop() -> None:  # a second command keeps `peers` a subcommand, as in offload-bench
        pass

    bench_peers.register(app)
    return app


def test_peers_on_a_tiny_checkpoint(tiny_dir, tmp_path):
    path = tiny_dir("mixtral")
    out = tmp_path / "peers.json"
    r = runner.invoke(_app(), ["peers", str(path), "--max-new-tokens", "4", "--repeats", "1", "--json", str(out),
                               "--work-dir", str(tmp_path / "work"),
                               "--only", "transformers-eager,accelerate-disk,moe-bf16-25%-disk"])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    rows = {row["id"]: row for row in res["rows"]}
    assert {row["engine"] for row in res["rows"]} == {"transformers", "accelerate", "moe-offload"}
    for row in rows.values():
        assert row["status"] == "ok", row
        assert row["tok_s"] > 0 and row["ttft_s"] > 0 and row["peak_rss_mib"] > 0
        assert row["ppl"] > 1 and row["ppl_tokens"] > 8
    # moe-offload bf16 (25% of experts resident, disk tier) is lossless against transformers' eager experts
    (check,) = res["lossless"]
    assert check["subject"] == "moe-bf16-25%-disk" and check["passed"], check
    assert rows["moe-bf16-25%-disk"]["cosine_vs_ref"] > 0.999
    assert rows["moe-bf16-25%-disk"]["ppl"] == rows["transformers-eager"]["ppl"]
    assert rows["moe-bf16-25%-disk"]["disk_bytes_per_token"] > 0  # a 25% cache misses, from the disk store
    # accelerate's disk offload reads every layer's full fused experts on each token: 3 layers x 8 experts
    cfg = json.loads((path / "config.json").read_text())
    expert_bytes = 3 * cfg["intermediate_size"] * cfg["hidden_size"] * 2  # gate, up, down; bf16
    assert rows["accelerate-disk"]["disk_bytes_per_token"] >= 3 * 8 * expert_bytes
    assert "lossless check PASS" in r.output
    if importlib.util.find_spec("llama_cpp") is None:
        assert bench_peers.LLAMA_MISSING in res["notes"]
    else:
        assert bench_peers.NO_GGUF in res["notes"]
    assert "llama.cpp rows skipped" in r.output


def test_peers_user_errors_are_one_line(tmp_path):
    r = runner.invoke(_app(), ["peers", str(tmp_path), "--work-dir", str(tmp_path / "w")])
    assert r.exit_code == 2 and "no config.json" in r.output
    (tmp_path / "config.json").write_text("{}")
    r = runner.invoke(_app(), ["peers", str(tmp_path), "--gguf", str(tmp_path / "missing.gguf"),
                               "--work-dir", str(tmp_path / "w")])
    assert r.exit_code == 2 and "does not exist" in r.output


def test_explicit_disk_map_puts_only_experts_on_disk(tiny_dir):
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights():
        m = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_dir("mixtral")))
    dm = bench_peers._disk_experts_map(m)
    assert sorted(k for k, v in dm.items() if v == "disk") == [f"model.layers.{i}.mlp.experts" for i in range(3)]
    assert "" not in dm and dm["lm_head"] == "cpu" and dm["model.layers.0.mlp.gate"] == "cpu"


def test_int4_group_divides_the_expert_inputs(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 1024, "intermediate_size": 3584}))
    assert bench_peers.int4_format(tmp_path) == "int4-g128"
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64, "intermediate_size": 96}))
    assert bench_peers.int4_format(tmp_path) == "int4-g32"


def test_cgroup_probe_is_clean_or_says_why():
    try:
        cg = bench_peers.MemoryCgroup(f"moe-offload-peers-test-{__import__('os').getpid()}", 256 * 2**20)
    except bench_peers.CgroupUnavailable as e:
        assert str(e)
        return
    assert cg.path.is_dir()
    cg.remove()
    assert not cg.path.exists()


def test_threads_list_runs_each_count_and_divides_by_the_peer(tiny_dir, tmp_path):
    path = tiny_dir("mixtral")
    out = tmp_path / "peers.json"
    r = runner.invoke(_app(), ["peers", str(path), "--max-new-tokens", "2", "--repeats", "1", "--json", str(out),
                               "--threads", "1,2", "--work-dir", str(tmp_path / "work"),
                               "--only", "transformers-eager,moe-bf16-100%-ram"])
    assert r.exit_code == 0, r.output
    runs = json.loads(out.read_text())["runs"]
    assert [run["threads"] for run in runs] == [1, 2]
    for run in runs:
        rows = {row["id"]: row for row in run["rows"]}
        ratio = rows["moe-bf16-100%-ram"]["vs_peers"]
        # llama.cpp-f16 did not run: only the eager reference's ratio, from this run's own medians
        assert ratio == {"transformers-eager": rows["moe-bf16-100%-ram"]["tok_s"] / rows["transformers-eager"]["tok_s"]}
        assert rows["transformers-eager"]["vs_peers"] == {}
    assert "peers at matching bits" in r.output and "x transformers-eager" in r.output


def test_threads_must_be_positive_integers(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    for bad in ("0", "1,x", ""):
        r = runner.invoke(_app(), ["peers", str(tmp_path), "--threads", bad, "--work-dir", str(tmp_path / "w")])
        assert r.exit_code == 2 and "--threads takes positive integers" in r.output, (bad, r.output)


def test_matching_bits_rows_quantize_the_dense_linears_too(tmp_path):
    rows = {s.id: s for s in bench_peers.moe_settings(64, tmp_path, "int4-g128")}
    assert rows["moe-int8-dense8-100%"].options == {"cache_experts": 64, "store": "disk", "bits": 8,
                                                    "store_dir": str(tmp_path / "bits8"), "dense_bits": 8}
    assert rows["moe-int4-dense4-100%"].options["bits"] == "int4-g128"
    assert rows["moe-int4-dense4-100%"].options["dense_bits"] == 4
    assert rows["moe-int4-dense4-100%"].peers == ("llama.cpp-Q4_K_M", "llama.cpp-Q4_0")
    assert rows["moe-bf16-100%-ram"].peers == ("llama.cpp-f16", "transformers-eager")
