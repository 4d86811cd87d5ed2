"""GPTQ: lower output error than quantizing from the weights alone, and a None where H has no factor."""
from __future__ import annotations

import pytest
import torch

from offload.formats.gptq import gptq, supports
from offload.formats.quant import dequantize, parse_format, quantize, storage_layout


def problem(N: int = 64, K: int = 128, n: int = 1024):
    """Correlated inputs of unequal scale (as a layer's are), Gaussian weights."""
    g = torch.Generator().manual_seed(0)
    mix = torch.eye(K) + 2 * torch.randn(K, K, generator=g) / K**0.5
    X = (torch.randn(n, K, generator=g) @ mix) * torch.linspace(0.2, 3.0, K)
    W = torch.randn(N, K, generator=g) * 0.05
    return X, W, 2 * X.T @ X / n


def calibration_loss(W: torch.Tensor, H: torch.Tensor, parts: dict, fmt) -> float:
    """GPTQ's objective on the calibration inputs: tr((W - Q) H (W - Q)^T) = 2/n ||X W^T - X Q^T||^2."""
    E = W - dequantize(parts, fmt, W.shape)
    return float(torch.einsum("nk,kl,nl->", E, H, E))


@pytest.mark.parametrize("name", ["int4-g32", "int4-g128", "int3-g32", "int2-g64", "ternary"])
def test_gptq_lowers_the_output_error(name):
    X, W, H = problem()
    fmt = parse_format(name)
    parts = gptq(W, H, fmt)
    assert [(k, tuple(v.shape), v.dtype) for k, v in parts.items()] == [
        (n, tuple(s), dt) for n, s, dt in storage_layout(fmt, W.shape)]
    out_err = lambda p: float((X @ (W - dequantize(p, fmt, W.shape)).T).norm())  # noqa: E731
    assert out_err(parts) < 0.93 * out_err(quantize(W, fmt))


@pytest.mark.parametrize("name,K", [("ternary-z70", 256), ("ternary-z80", 256), ("ternary-z90", 256),
                                    ("ternary-z80", 288), ("ternary-z90", 160)])
def test_joint_sparse_ternary_has_exactly_the_zeros_and_beats_threshold_first(name, K):
    _, W, H = problem(K=K)
    fmt = parse_format(name)
    joint, fixed = gptq(W, H, fmt, support="joint"), gptq(W, H, fmt, support="fixed")
    t = dequantize(joint, fmt, W.shape)
    keep = round((1 - fmt.zeros / 100) * K)
    assert (t != 0).sum(dim=1).tolist() == [keep] * W.shape[0], "every row keeps exactly its share of nonzeros"
    assert (dequantize(fixed, fmt, W.shape) != 0).sum(dim=1).tolist() == [keep] * W.shape[0]
    weights = calibration_loss(W, H, quantize(W, fmt), fmt)
    assert calibration_loss(W, H, joint, fmt) < 0.99 * calibration_loss(W, H, fixed, fmt)
    assert calibration_loss(W, H, joint, fmt) < 0.99 * weights


def test_threshold_first_keeps_the_weight_only_support():
    _, W, H = problem()
    fmt = parse_format("ternary-z80")
    assert torch.equal(dequantize(gptq(W, H, fmt, support="fixed"), fmt, W.shape) != 0,
                       dequantize(quantize(W, fmt), fmt, W.shape) != 0)


def test_no_cholesky_factor_is_none():
    _, W, H = problem()
    assert gptq(W, -H, parse_format("int4-g32")) is None
    assert gptq(W, -H, parse_format("ternary-z80")) is None


def test_int8_and_adaptive_stay_weight_only():
    assert not supports(parse_format("int8")) and not supports(parse_format("int4-adaptive"))
    assert supports(parse_format("ternary")) and supports(parse_format("int2-g32"))
    assert supports(parse_format("ternary-z80"))


@pytest.mark.parametrize("name", ["ternary", "ternary-z80", "ternary-z90"])
def test_ternary_scales_are_refitted_to_the_least_squares_optimum(name):
    _, W, H = problem(K=256)
    fmt = parse_format(name)
    one, two = gptq(W, H, fmt, passes=1), gptq(W, H, fmt, passes=2)
    assert calibration_loss(W, H, two, fmt) <= calibration_loss(W, H, one, fmt)
    for f in (0.98, 1.02):  # the stored scale is the optimum given the codes: moving it costs
        moved = {**two, "scales": (two["scales"].float() * f).bfloat16()}
        assert calibration_loss(W, H, moved, fmt) > calibration_loss(W, H, two, fmt)


def test_matrix_support_has_the_matrix_share_of_zeros_and_beats_per_row():
    _, W, H = problem(K=256)
    fmt = parse_format("ternary-z80")
    matrix, joint = gptq(W, H, fmt, support="matrix"), gptq(W, H, fmt, support="joint")
    t = dequantize(matrix, fmt, W.shape)
    assert int((t != 0).sum()) == W.shape[0] * round(0.2 * 256)
    assert calibration_loss(W, H, matrix, fmt) < calibration_loss(W, H, joint, fmt)
