"""Calibrated (GPTQ) conversion: end to end on a tiny checkpoint, the weight-only fallback recorded, the
calibration file in the store's settings, and a killed conversion resuming to the same bytes."""
from __future__ import annotations

import hashlib
import json
import random

import pytest
import torch

from offload import OffloadedModel, OffloadError
from offload.config import OffloadConfig
from offload.store import calibrate
from offload.store.calibrate import CalibratedCodec
from offload.store.convert import build_store
from offload.store.disk import DATA, INDEX, DiskStore

FMT = "int4-g32"


def words(n: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return " ".join(f"w{rng.randrange(90)}" for _ in range(n))


def digest(store_dir):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(store_dir.iterdir())}


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "calibration.txt"
    path.write_text(words(600))
    return path


def test_calibrated_store_loads_generates_and_differs_from_weight_only(tiny_dir, tmp_path, text):
    model_dir = tiny_dir("mixtral")
    build_store(model_dir, tmp_path / "w", bits=FMT, progress=False)
    build_store(model_dir, tmp_path / "c", bits=FMT, progress=False, calibration=str(text))
    index = json.loads((tmp_path / "c" / INDEX).read_text())
    assert index["settings"]["calibration"]["sha256"] == hashlib.sha256(text.read_bytes()).hexdigest()
    assert index["calibration"]["weight_only"] == []  # 600 tokens, top-2 of 8: every expert sees plenty
    w, c = DiskStore(tmp_path / "w"), DiskStore(tmp_path / "c")
    assert w.keys() == c.keys() and all(w.format_of(k) == c.format_of(k) for k in w.keys())
    assert (tmp_path / "w" / DATA).read_bytes() != (tmp_path / "c" / DATA).read_bytes()
    w.close(), c.close()
    with OffloadedModel.from_pretrained(model_dir, store="disk", store_dir=str(tmp_path / "c"), bits=FMT,
                                        calibration=str(text)) as m:
        out = m.generate(torch.tensor([[1, 5, 9, 13]]), max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 9)


def test_experts_with_few_tokens_are_weight_only_and_listed(tiny_dir, tmp_path):
    model_dir = tiny_dir("mixtral")
    short = tmp_path / "short.txt"
    short.write_text(words(64, seed=1))  # 128 routings per layer over 8 experts: about 16 each
    build_store(model_dir, tmp_path / "w", bits=FMT, progress=False)
    build_store(model_dir, tmp_path / "c", bits=FMT, progress=False, calibration=str(short))
    stats = torch.load(tmp_path / "c" / calibrate.CACHE, weights_only=True)["stats"]
    tokens = {tuple(int(i) for i in k.split(".")): v["tokens"] for k, v in stats.items()}
    index = json.loads((tmp_path / "c" / INDEX).read_text())
    listed = {tuple(k) for k in index["calibration"]["weight_only"]}
    w, c = DiskStore(tmp_path / "w", direct=False), DiskStore(tmp_path / "c", direct=False)
    assert listed == {k for k in c.keys() if tokens.get(k, 0) < calibrate.MIN_TOKENS}
    assert 0 < len(listed) < len(c.keys())
    for k in c.keys():  # the listed records are exactly the weight-only ones
        a, b = (torch.zeros(s.record_bytes, dtype=torch.uint8) for s in (w, c))
        w.read_into(k, a), c.read_into(k, b)
        assert torch.equal(a, b) == (k in listed)
    w.close(), c.close()


def test_another_calibration_text_refuses_the_store(tiny_dir, tmp_path, text):
    model_dir = tiny_dir("mixtral")
    build_store(model_dir, tmp_path / "c", bits=FMT, progress=False, calibration=str(text))
    other = tmp_path / "other.txt"
    other.write_text(words(600, seed=2))
    with pytest.raises(OffloadError, match="was made with dtype"):
        build_store(model_dir, tmp_path / "c", bits=FMT, progress=False, calibration=str(other))


def test_missing_calibration_file_is_one_line_with_the_fix(tmp_path):
    with pytest.raises(OffloadError, match=r"calibration file .* not found; pass an existing text file"):
        OffloadConfig(store="disk", store_dir=str(tmp_path / "s"), bits=FMT, calibration=str(tmp_path / "nope.txt"))
    with pytest.raises(OffloadError, match="give a quantized format"):
        OffloadConfig(store="disk", store_dir=str(tmp_path / "s"), calibration=str(tmp_path))


@pytest.mark.parametrize("bits,coder", [(FMT, "lzma"), ("ternary-z80", "dict16"), ("ternary-z90", "lzma")])
def test_killed_calibrated_conversion_resumes_byte_identical(tiny_dir, tmp_path, monkeypatch, text, bits, coder):
    model_dir = tiny_dir("mixtral")
    build = lambda out: build_store(model_dir, tmp_path / out, bits=bits, progress=False,  # noqa: E731
                                    calibration=str(text), entropy_coder=coder)
    build("clean")
    calls = {"n": 0}
    real = CalibratedCodec.encode

    def dying_encode(self, key, tensors):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt  # killed mid-way, after the calibration pass
        return real(self, key, tensors)

    monkeypatch.setattr(CalibratedCodec, "encode", dying_encode)
    monkeypatch.setattr("offload.store.convert.time.monotonic", iter(range(0, 10**6, 2)).__next__)  # journal every record
    with pytest.raises(KeyboardInterrupt):
        build("resumed")
    assert not (tmp_path / "resumed" / INDEX).exists()
    monkeypatch.setattr(CalibratedCodec, "encode", real)
    collected = []
    monkeypatch.setattr(calibrate, "collect", lambda *a, **k: collected.append(1))  # a resume must reuse the cache
    build("resumed")
    assert not collected
    assert digest(tmp_path / "resumed") == digest(tmp_path / "clean")


def test_convert_cli_names_a_missing_calibration_file(tiny_dir, tmp_path):
    from typer.testing import CliRunner

    from offload.cli.convert import convert_app

    r = CliRunner().invoke(convert_app, [str(tiny_dir("mixtral")), "--out", str(tmp_path / "s"), "--bits", FMT,
                                         "--calibration", str(tmp_path / "nope.txt")])
    assert r.exit_code == 2 and "--calibration FILE" in r.output and "Traceback" not in r.output
