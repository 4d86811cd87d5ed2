"""Trace: replay order, padding, .npz round trips (ours and other tools'), atomic writes."""
from __future__ import annotations

import numpy as np
import pytest

from cache import Trace

EXPERTS = np.array(
    [
        [[3, 1], [0, -1]],  # token 0: layer 2 -> 3, 1; layer 5 -> 0 (second slot is padding)
        [[1, 1], [7, 2]],  # token 1: layer 2 -> 1 twice (merged); layer 5 -> 7 (>= num_experts: padding), 2
    ]
)
WEIGHTS = np.array([[[0.6, 0.4], [1.0, 0.0]], [[0.5, 0.5], [0.3, 0.7]]], dtype=np.float32)


def small() -> Trace:
    return Trace(
        EXPERTS, WEIGHTS, num_experts=4, moe_layers=[2, 5], model_type="mixtral", expert_bytes=1 << 20,
        prompt_boundaries=[0], prefill_tokens=[1],
    )  # fmt: skip


def test_keys_are_token_major_layer_then_k_without_padding():
    assert small().keys() == [(2, 3), (2, 1), (5, 0), (2, 1), (5, 2)]


def test_steps_merge_repeats_and_need():
    steps = list(small().steps())
    assert steps[2] == (1, 0, [((2, 1), 2, pytest.approx(1.0))])  # repeated id: one key, two uses
    assert small().step_need().tolist() == [2, 1]


def test_save_load_round_trip(tmp_path):
    path = tmp_path / "trace.npz"
    small().save(path)
    loaded = Trace.load(path)
    assert np.array_equal(loaded.experts, EXPERTS) and np.array_equal(loaded.weights, WEIGHTS)
    assert loaded.weights.dtype == np.float32
    fields = ("num_experts", "moe_layers", "top_k", "model_type", "expert_bytes", "prompt_boundaries", "prefill_tokens")
    for field in fields:
        assert getattr(loaded, field) == getattr(small(), field), field
    assert loaded.keys() == small().keys()
    with np.load(path) as data:
        assert data["experts"].dtype == np.int16  # compact on disk


def test_load_foreign_npz_with_only_experts_and_weights(tmp_path):
    path = tmp_path / "other_tool.npz"
    np.savez(path, experts=np.array([[[0, 5]], [[2, 3]], [[5, 1]]], dtype=np.int32), weights=np.ones((3, 1, 2)))
    trace = Trace.load(path)
    assert trace.num_experts == 6 and trace.moe_layers == [0] and trace.top_k == 2
    assert trace.model_type == "" and trace.expert_bytes is None and trace.weights.dtype == np.float32
    assert trace.keys() == [(0, 0), (0, 5), (0, 2), (0, 3), (0, 5), (0, 1)]


def test_load_rejects_a_file_without_experts(tmp_path):
    np.savez(tmp_path / "x.npz", logits=np.zeros(3))
    with pytest.raises(ValueError, match="no 'experts'"):
        Trace.load(tmp_path / "x.npz")


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "trace.npz"
    small().save(path)
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez_compressed", crash)
    with pytest.raises(OSError, match="disk full"):
        Trace(np.zeros((1, 1, 1), np.int64), np.zeros((1, 1, 1))).save(path)
    assert path.read_bytes() == before  # the old trace is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["trace.npz"]  # and no temp file is left behind
