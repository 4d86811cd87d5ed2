"""groupwise.quantize_groups gives exactly the codes of the straightforward search over the same clip factors;
clip="fast" searches fewer factors, within a stated error of the full search."""
from __future__ import annotations

import pytest
import torch

from offload.formats import compiled, groupwise
from offload.formats.quant import GROUP_SIZES, FormatError, QFormat, dequantize, parse_format, quantize


def reference_quantize_groups(w: torch.Tensor, bits: int, G: int, factors=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The search as first written: every candidate's codes computed and the best carried along."""
    N, K = w.shape
    top, mid = (1 << bits) - 1, 1 << (bits - 1)
    g = w.float().view(N, K // G, G)
    hi, lo = g.amax(-1, keepdim=True), g.amin(-1, keepdim=True)
    best = None
    for shrink in factors or groupwise.SHRINKS[bits]:
        half = (hi - lo) * (shrink / 2)
        scale = (2 * half / top).clamp(min=1e-20).bfloat16().float()
        zero = ((hi + lo) / 2 - half + mid * scale).bfloat16().float()
        q = ((g - zero) / scale).round_().add_(mid).clamp_(0, top)
        err = ((q - mid) * scale + zero - g).square_().sum(-1, keepdim=True)
        if best is None:
            best = [q, scale, zero, err]
            continue
        better = err < best[3]
        best = [torch.where(better, new, old) for new, old in zip((q, scale, zero, err), best)]
    qsz = torch.cat([best[1], best[2]], -1).bfloat16().transpose(0, 1).contiguous()
    return best[0].view(N, K).to(torch.uint8), qsz


def matrices() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    heavy = torch.distributions.StudentT(3.0).sample((96, 384)) * 0.02
    heavy[:, 5] *= 40                       # an outlier input feature, in every row
    heavy[7, ::3] = 0.0                     # a row with exact zeros
    heavy[9, :32] = 0.125                   # a constant group (zero range)
    return {"gaussian": torch.randn(96, 384, generator=g) * 0.02, "outliers": heavy}


@pytest.mark.parametrize("bits", [4, 3, 2])
@pytest.mark.parametrize("G", GROUP_SIZES)
@pytest.mark.parametrize("name", ["gaussian", "outliers"])
def test_codes_and_scales_equal_the_reference(bits, G, name, monkeypatch):
    w = matrices()[name]
    want = reference_quantize_groups(w, bits, G)
    for block, chunk in ((groupwise.BLOCK, groupwise.CHUNK), (7 * 384, 5 * 384)):  # one block; blocks and passes
        monkeypatch.setattr(groupwise, "BLOCK", block)                              # that leave a short last one
        monkeypatch.setattr(groupwise, "CHUNK", chunk)
        got = groupwise.quantize_groups(w, bits, G)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.skipif(not compiled.builds(), reason="inductor cannot build here (no C++ compiler)")
@pytest.mark.parametrize("bits", [4, 3, 2])
def test_the_compiled_search_gives_the_reference_bytes(bits, monkeypatch):
    monkeypatch.setattr(compiled, "MIN_WEIGHTS", 0)  # every matrix takes the compiled search
    w = matrices()["outliers"][:94]                 # zeros, a constant group, an outlier feature
    factors = groupwise.shrinks(bits, 32, "fast")
    want = reference_quantize_groups(w, bits, 32, factors)
    for block in (groupwise.BLOCK, 7 * 384):        # one block; 13 compiled blocks of 7 rows, 3 eager rows
        monkeypatch.setattr(groupwise, "BLOCK", block)
        for x in (w, w.t().contiguous().t(), w.bfloat16()):  # any strides, a checkpoint's dtype
            got = groupwise.quantize_groups(x, bits, 32, factors)
            ref = want if x.dtype == w.dtype else reference_quantize_groups(x, bits, 32, factors)
            assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


@pytest.mark.parametrize("bits", [4, 3, 2])
@pytest.mark.parametrize("G", GROUP_SIZES)
def test_fast_factors_give_the_reference_codes_of_those_factors(bits, G):
    w = matrices()["outliers"].bfloat16()  # a checkpoint's dtype, converted a chunk at a time
    factors = groupwise.shrinks(bits, G, "fast")
    assert 1.0 in factors and len(factors) <= len(groupwise.SHRINKS[bits]) / 2 + 1
    want = reference_quantize_groups(w.float(), bits, G, factors)
    got = groupwise.quantize_groups(w, bits, G, factors)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# fast / full-search relative weight error, at most (measured worst: 1.0044 / 1.0082 / 1.0065)
BOUND = {4: 1.006, 3: 1.010, 2: 1.010}


@pytest.mark.parametrize("bits", [4, 3, 2])
@pytest.mark.parametrize("G", GROUP_SIZES)
def test_fast_error_is_within_its_bound_of_the_full_search(bits, G):
    w = torch.randn(256, 1024, generator=torch.Generator().manual_seed(bits * G)) * 0.02
    errors = {}
    for clip in groupwise.CLIPS:
        fmt = QFormat(f"int{bits}", G, clip=clip)
        errors[clip] = float((dequantize(quantize(w, fmt), fmt, w.shape) - w).norm() / w.norm())
    minmax = reference_quantize_groups(w, bits, G, (1.0,))
    fmt = QFormat(f"int{bits}", G)
    plain = dequantize({**fmt.kind_object.pack(minmax[0]), "qsz": minmax[1]}, fmt, w.shape)
    assert errors["search"] <= errors["fast"] <= BOUND[bits] * errors["search"]
    assert errors["fast"] < float((plain - w).norm() / w.norm())  # still better than no search
    assert errors["minmax"] == float((plain - w).norm() / w.norm())  # -minmax is no search, exactly


def test_minmax_is_reachable_by_name_and_codes_each_groups_own_range():
    fmt = parse_format("int2-g64-minmax")
    assert fmt == QFormat("int2", 64, clip="minmax") and str(fmt) == "int2-g64-minmax"
    w = matrices()["outliers"]
    codes, qsz = reference_quantize_groups(w, 2, 64, (1.0,))
    parts = quantize(w, fmt)
    assert torch.equal(parts["qsz"], qsz)
    with pytest.raises(FormatError, match="-search and -minmax apply to int4/int3/int2 only"):
        parse_format("int8-minmax")


def test_search_is_reachable_by_name_and_is_the_full_search():
    fmt = parse_format("int3-g32-search")
    assert fmt == QFormat("int3", 32, clip="search") and str(fmt) == "int3-g32-search"
    assert parse_format("int3-g32").clip == "fast" and str(parse_format("int3-g32")) == "int3-g32"
    assert str(parse_format("int2-adaptive-search")) == "int2-adaptive-search"
    w = matrices()["outliers"]
    codes, qsz = reference_quantize_groups(w, 3, 32)
    parts = quantize(w, fmt)
    assert torch.equal(parts["qsz"], qsz)
    assert torch.equal(fmt.kind_object.codes(fmt, parts, *w.shape), codes + 8 - 4)


def test_two_quantizations_are_byte_identical():
    w = matrices()["gaussian"].bfloat16()
    for name in ("int4-g32", "int3-g64", "int2-g128", "int8", "int4-g128-search"):
        a, b = quantize(w, parse_format(name)), quantize(w, parse_format(name))
        assert all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a)
