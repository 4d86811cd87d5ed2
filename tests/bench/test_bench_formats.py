"""offload-bench formats: the JSON on a tiny checkpoint, the sliding-window perplexity, bad input, and the
converter's peak memory on ~200 MB of experts (measured in a subprocess, as the benchmark measures it)."""
from __future__ import annotations

import json
import math
import random

import pytest
import torch
from typer.testing import CliRunner

from offload.bench.app import app
from offload.bench.formats import agreement, perplexity, register

register(app)  # idempotent: a no-op once offload/bench/app.py registers it itself
runner = CliRunner()

# hidden 64 / intermediate 96 in the tiny models: only group size 32 divides both
FORMATS = "bf16,int8,int4-g32,int3-g32,int2-g32,ternary,ternary-z90"


def _text(path, words: int = 500, vocab: int = 96):
    rng = random.Random(0)
    path.write_text(" ".join(f"w{rng.randrange(vocab - 3)}" for _ in range(words)))
    return path


def test_formats_json_on_a_tiny_checkpoint(tiny_dir, tmp_path):
    model = tiny_dir("mixtral")
    args = ["formats", str(model), "--bits", FORMATS, "--text", str(_text(tmp_path / "heldout.txt")),
            "--tokens", "16", "--repeats", "1", "--json", str(tmp_path / "f.json"), "--work-dir", str(tmp_path / "w")]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "f.json").read_text())
    rows = res["formats"]
    assert list(rows) == FORMATS.split(",") and all(v["status"] == "ok" for v in rows.values())
    bits = {f: v["size"]["bits_per_param"] for f, v in rows.items()}
    assert bits["bf16"] == 16
    assert bits["int8"] > bits["int4-g32"] > bits["int3-g32"] > bits["int2-g32"] > bits["ternary"] > 1.58
    assert bits["ternary"] > 1.5 * bits["ternary-z90"]  # lzma-coded sparse codes, measured from the files
    err = {f: v["coding"]["weight_error"] for f, v in rows.items()}
    assert err["bf16"] == 0 < err["int8"] < err["int4-g32"] < err["int3-g32"] < err["int2-g32"] < err["ternary"] \
        < err["ternary-z90"] < 0.8
    assert [v["size"]["lzma_records"] for v in rows.values()] == [0] * 6 + [24]
    z90 = rows["ternary-z90"]["coding"]
    assert z90["bits"]["lzma"] < z90["bits"]["lz4"] < z90["bits"]["raw"] and z90["read_ms"] > 0
    assert z90["bits"]["lzma"] < 1.2 * z90["bits"]["entropy"]  # near the order-0 entropy (4 KB records: +11%)
    assert rows["bf16"]["agreement"] == 1.0 and rows["bf16"]["first_divergence"] is None
    assert rows["int8"]["agreement"] > 0.5  # int8 is near-lossless even on a random model
    assert all(math.isfinite(v["perplexity"]) and v["perplexity"] > 1 for v in rows.values())
    assert res["text"]["tokens_scored"] == res["text"]["tokens"] - 1 and res["text"]["window"] == 256
    assert [s["format"] for s in res["speed"]] == ["bf16", "int8", "int4-g32"]
    assert all(s["tok_s"] > 0 and s["hit_rate"] == 1.0 for s in res["speed"])
    conv = rows["int8"]["convert"]
    assert conv["when"] == "this run" and conv["seconds"] > 0 and conv["peak_rss"] > 0
    for title in ("quality", "size", "coding", "decode speed", "converter"):
        assert title in r.output

    # a second run reuses the converted stores and reports the first conversion's numbers
    r = runner.invoke(app, [*args[:3], "bf16,int8", *args[4:]])
    assert r.exit_code == 0, r.output
    again = json.loads((tmp_path / "f.json").read_text())["formats"]["int8"]
    assert again["convert"]["when"] == "earlier run" and again["perplexity"] == rows["int8"]["perplexity"]


def test_formats_that_do_not_divide_are_skipped_with_the_reason(tiny_dir, tmp_path):
    r = runner.invoke(app, ["formats", str(tiny_dir("mixtral")), "--bits", "int4-g128", "--text",
                            str(_text(tmp_path / "t.txt", 100)), "--tokens", "4", "--repeats", "1",
                            "--json", str(tmp_path / "f.json"), "--work-dir", str(tmp_path / "w")])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "f.json").read_text())
    assert res["formats"]["int4-g128"]["status"] == "skipped" and "divisible" in res["skipped"]["int4-g128"]
    assert "skipped int4-g128" in r.output


@pytest.mark.parametrize("extra, message", [
    (["--bits", "int5"], "unknown weight format"),
    (["--bits", "int8-g32"], "takes no group size"),
    (["--text", "/nonexistent/heldout.txt"], "does not exist"),
])
def test_bad_input_is_one_red_line_and_exit_2(tiny_dir, tmp_path, extra, message):
    r = runner.invoke(app, ["formats", str(tiny_dir("mixtral")), "--work-dir", str(tmp_path), *extra])
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, r.output
    assert len(r.output.strip().splitlines()) <= 2


def test_missing_model_dir_is_one_red_line(tmp_path):
    r = runner.invoke(app, ["formats", str(tmp_path / "nope"), "--text", str(_text(tmp_path / "t.txt", 50))])
    assert r.exit_code == 2 and "does not exist" in r.output


class _Bigram:
    """A fake model whose logits at position t depend only on token t: any window gives the same scores."""

    def __init__(self, vocab: int = 11) -> None:
        self.table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0))

    def __call__(self, ids, use_cache=False):
        return type("Out", (), {"logits": self.table[ids]})


@pytest.mark.parametrize("window", [2, 5, 16, 37, 100])
def test_sliding_window_scores_every_token_once(window):
    model = _Bigram()
    ids = torch.randint(0, 11, (1, 37), generator=torch.Generator().manual_seed(1))
    full = torch.nn.functional.cross_entropy(model.table[ids[0, :-1]], ids[0, 1:]).exp().item()
    ppl, n = perplexity(model, ids, window)
    assert n == 36 and ppl == pytest.approx(full, rel=1e-6)


def test_agreement():
    assert agreement([1, 2, 3, 4], [1, 2, 3, 4]) == (1.0, None)
    assert agreement([1, 2, 3, 4], [1, 9, 3, 4]) == (0.75, 1)
    assert agreement([1, 2], [5, 6]) == (0.0, 0)
