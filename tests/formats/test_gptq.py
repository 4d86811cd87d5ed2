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


@pytest.mark.parametrize("name", ["int4-g32", "int4-g128", "int3-g32", "int2-g64", "ternary"])
def test_gptq_lowers_the_output_error(name):
    X, W, H = problem()
    fmt = parse_format(name)
    parts = gptq(W, H, fmt)
    assert [(k, tuple(v.shape), v.dtype) for k, v in parts.items()] == [
        (n, tuple(s), dt) for n, s, dt in storage_layout(fmt, W.shape)]
    out_err = lambda p: float((X @ (W - dequantize(p, fmt, W.shape)).T).norm())  # noqa: E731
    assert out_err(parts) < 0.93 * out_err(quantize(W, fmt))


def test_no_cholesky_factor_is_none():
    _, W, H = problem()
    assert gptq(W, -H, parse_format("int4-g32")) is None


def test_sparse_ternary_and_int8_stay_weight_only():
    assert not supports(parse_format("ternary-z80")) and not supports(parse_format("int8"))
    assert supports(parse_format("ternary")) and supports(parse_format("int2-g32"))
