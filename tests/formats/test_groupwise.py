"""The fast clip search in groupwise.quantize_groups gives exactly the codes of the straightforward one."""
from __future__ import annotations

import pytest
import torch

from offload.formats import groupwise
from offload.formats.quant import GROUP_SIZES, QFormat, quantize


def reference_quantize_groups(w: torch.Tensor, bits: int, G: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The search as first written: every candidate's codes computed and the best carried along."""
    N, K = w.shape
    top, mid = (1 << bits) - 1, 1 << (bits - 1)
    g = w.float().view(N, K // G, G)
    hi, lo = g.amax(-1, keepdim=True), g.amin(-1, keepdim=True)
    best = None
    for shrink in groupwise.SHRINKS[bits]:
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
    for chunk in (groupwise.CHUNK, 5 * 384):  # one chunk, and chunks that leave a short last one
        monkeypatch.setattr(groupwise, "CHUNK", chunk)
        got = groupwise.quantize_groups(w, bits, G)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_quantize_packs_the_reference_codes():
    w = matrices()["outliers"]
    codes, qsz = reference_quantize_groups(w, 3, 32)
    fmt = QFormat("int3", 32)
    parts = quantize(w, fmt)
    assert torch.equal(parts["qsz"], qsz)
    assert torch.equal(fmt.kind_object.codes(fmt, parts, *w.shape), codes + 8 - 4)
