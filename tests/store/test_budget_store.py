"""A store at a bits budget (ternary-bX): its measured bits/param within the budget, each record's kind naming
the shares its codes have, the codes decoding to exactly what the encoder chose, and a killed conversion
resuming byte-identical without measuring again."""
from __future__ import annotations

import hashlib
import json
import math
import random
import re

import pytest
import torch

from offload import OffloadedModel
from offload.config import OffloadConfig
from offload.formats.quant import QFormat, dequantize
from offload.formats.record import MATRICES
from offload.store import allocation, calibrate
from offload.store.allocation import CACHE, BudgetCodec
from offload.store.convert import build_store, codec_for
from offload.store.disk import DATA, INDEX, DiskStore
from offload.store.source import open_checkpoint

BUDGET = "ternary-b1.2"


@pytest.fixture
def text(tmp_path):
    rng = random.Random(0)
    path = tmp_path / "calibration.txt"
    path.write_text(" ".join(f"w{rng.randrange(90)}" for _ in range(600)))
    return path


def digest(store_dir):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(store_dir.iterdir())}


def test_budget_store_fits_names_its_shares_and_decodes_exactly(tiny_dir, tmp_path, text):
    model_dir = tiny_dir("mixtral")
    out = tmp_path / "b"
    build_store(model_dir, out, bits=BUDGET, progress=False, calibration=str(text))
    _, arch, source, _ = open_checkpoint(model_dir, torch.bfloat16)
    params = len(source.keys()) * sum(math.prod(s.shape) for s in source.layout.specs)
    bits = 8 * ((out / INDEX).stat().st_size + (out / DATA).stat().st_size) / params
    assert 0.9 * 1.2 < bits <= 1.2, "the store spends its budget, and no more"
    choice = json.loads((out / CACHE).read_text())["zeros"]
    cfg = OffloadConfig(store="disk", store_dir=str(out), bits=BUDGET, calibration=str(text))
    codec = codec_for(cfg, source, arch)
    stats = calibrate.calibrated_codec(codec, source, text, out, torch.bfloat16).stats
    encoder = calibrate.CalibratedCodec(codec, stats)
    store = DiskStore(out)
    kinds = set()
    for key in store.keys():
        name = store.format_of(key)
        kinds.add(name)
        shares = [int(z) for z in re.fullmatch(r"ternary-z(\d+)/ternary-z(\d+)", name).groups()]
        assert shares == choice[f"{key[0]}.{key[1]}"]
        buf = torch.empty(store.buffer_bytes, dtype=torch.uint8)
        store.read_into(key, buf)
        kind = codec.kind_named(name)
        parts = kind.split(kind.storage.views(buf))
        dense = source.read(key)
        for i, (m, z) in enumerate(zip(MATRICES, shares)):
            fmt = QFormat("ternary", zeros=z)
            stored = dequantize(parts[m], fmt, kind.shapes[i])
            N, K = kind.shapes[i]
            assert (stored != 0).sum(1).tolist() == [round((1 - z / 100) * K)] * N
            w = (dense[m].T if arch.transposed else dense[m]).float()
            assert torch.equal(stored, dequantize(encoder.quantize_matrix(key, m, w, fmt), fmt, kind.shapes[i]))
    store.close()
    assert len(kinds) > 1, "the budget gives matrices different shares"
    with OffloadedModel.from_pretrained(model_dir, store="disk", store_dir=str(out), bits=BUDGET,
                                        calibration=str(text)) as m:
        assert m.generate(torch.tensor([[1, 5, 7]]), max_new_tokens=4, do_sample=False).shape == (1, 7)


def test_killed_budget_conversion_resumes_byte_identical(tiny_dir, tmp_path, monkeypatch, text):
    model_dir = tiny_dir("mixtral")
    build = lambda out: build_store(model_dir, tmp_path / out, bits=BUDGET, progress=False,  # noqa: E731
                                    calibration=str(text))
    build("clean")
    real = BudgetCodec.encode
    calls = {"n": 0}

    def dying_encode(self, key, tensors):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return real(self, key, tensors)

    monkeypatch.setattr(BudgetCodec, "encode", dying_encode)
    monkeypatch.setattr("offload.store.convert.time.monotonic", iter(range(0, 10**6, 2)).__next__)
    with pytest.raises(KeyboardInterrupt):
        build("resumed")
    monkeypatch.setattr(BudgetCodec, "encode", real)
    monkeypatch.setattr(allocation, "measure", lambda *a: pytest.fail("a resume must reuse budget.json"))
    build("resumed")
    assert digest(tmp_path / "resumed") == digest(tmp_path / "clean")


def test_budget_holds_where_only_some_records_are_long_enough_to_be_aligned(tiny_dir, tmp_path, text, monkeypatch):
    """Records of ALIGN_MIN bytes or more start aligned: the padding before the longer records is paid for even
    where the average record is shorter than ALIGN_MIN."""
    model_dir = tiny_dir("mixtral")
    _, arch, source, _ = open_checkpoint(model_dir, torch.bfloat16)
    per_expert = sum(math.prod(s.shape) for s in source.layout.specs)
    from offload.store import convert
    for module in (convert, allocation):  # tiny records: a 256-byte grid, the average record just short of it
        monkeypatch.setattr(module, "ALIGN", 256)
        monkeypatch.setattr(module, "ALIGN_MIN", int(1.2 * per_expert / 8) + 1)
    out = tmp_path / "b"
    build_store(model_dir, out, bits=BUDGET, progress=False, calibration=str(text))
    records = json.loads((out / INDEX).read_text())["records"]
    aligned = [r for r in records if r[5] >= allocation.ALIGN_MIN]
    assert 0 < len(aligned) < len(records), "some records are aligned, not all"
    cfg = OffloadConfig(store="disk", store_dir=str(out), bits=BUDGET, calibration=str(text))
    codec = codec_for(cfg, source, arch)
    allowed = int(1.2 * len(records) * per_expert / 8) - allocation.index_bytes(codec, source.keys(),
                                                                                 len({r[2] for r in records}))
    assert (out / DATA).stat().st_size <= allowed, "records and the padding before them fit the budget"
