"""offload.formats.quant / offload.formats.packing / offload.formats.ternary: kernel equivalence, known answers, contracts, round trips."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from offload.formats import compiled, kinds, packing, quant
from offload.errors import OffloadError
from offload.formats.groupwise import quantize_groups, shrinks
from offload.formats.quant import FormatError, QFormat, parse_format
from offload.formats.ternary import ternarize

SHAPES = [(64, 128), (96, 256), (256, 512)]  # 96 rows: one 64-row kernel block plus a 32-row tail
FORMATS = ["bf16", "fp32", "int8", "int4-g32", "int4-g64", "int4", "int3-g32", "int3", "int2-g32", "int2", "ternary",
           "ternary-z80", "ternary-z90"]
# Relative Frobenius error bounds on Gaussian weights. Measured at 1024x3584: int8 0.009, int4 g32/g64/g128
# 0.076/0.086/0.095, int3 g32/g128 0.155/0.184, int2 g32/g128 0.313/0.345, ternary 0.436, ternary-z80 0.620,
# ternary-z90 0.758.
MAX_ERR = {"bf16": 0.004, "fp32": 1e-7, "int8": 0.011, "int4-g32": 0.085, "int4-g64": 0.095, "int4": 0.105,
           "int3-g32": 0.17, "int3": 0.20, "int2-g32": 0.33, "int2": 0.37, "ternary": 0.45, "ternary-z80": 0.63,
           "ternary-z90": 0.77}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def gaussian(shape, seed=0, dtype=torch.float32) -> torch.Tensor:
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.02).to(dtype)


def layout_of(tensors: dict[str, torch.Tensor]) -> list:
    return [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]


# ---- reference equivalence: torch's CPU int4 kernel ------------------------------------------------

@pytest.mark.parametrize("N,K", [(64, 128), (96, 256), (80, 64), (16, 32), (192, 96)])
def test_pack_int4_matches_torch_packing(N, K):
    codes = torch.randint(0, 16, (N, K), dtype=torch.int32, generator=torch.Generator().manual_seed(N + K))
    native = packing.native_layout()
    ref = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    assert torch.equal(packing.pack_int4(codes.to(torch.uint8), native), ref)
    for layout in packing.LAYOUTS:  # every layout inverts, and relayout is exact
        packed = packing.pack_int4(codes.to(torch.uint8), layout)
        assert torch.equal(packing.unpack_int4(packed, N, K, layout), codes.to(torch.uint8)), layout
        assert torch.equal(packing.relayout_int4(packed, N, K, layout, native), ref), layout


@pytest.mark.parametrize("N,K", [(64, 128), (192, 96), (80, 64), (16, 32)])
def test_pack_int4_in_steps_and_word_packers_equal_the_stream_packers(N, K, monkeypatch):
    codes = torch.randint(0, 16, (N, K), dtype=torch.uint8, generator=torch.Generator().manual_seed(N * K))
    ref = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.int(), 1)
    monkeypatch.setattr(packing, "PACK_CHUNK", 64 * 32)  # one 64-row block per step, then the tail
    assert torch.equal(packing.pack_int4(codes, packing.native_layout()), ref)
    for top in (3, 7, 15):  # int2, int3 and any code: only the bits asked for are read
        c = codes % (top + 1)
        stream, kernel = packing.kernel_order(c), packing.pack_int4(c).view(-1)
        assert torch.equal(packing.pack_low2(kernel), packing.pack_bits(stream & 3, 2))
        assert torch.equal(packing.pack_bit2(kernel), packing.pack_bits((stream >> 2) & 1, 1))


@pytest.mark.skipif(not compiled.builds(), reason="inductor cannot build here (no C++ compiler)")
def test_compiled_pack_int4_matches_torch_packing(monkeypatch):
    monkeypatch.setattr(compiled, "MIN_WEIGHTS", 0)  # every whole-block matrix takes the compiled pack
    codes = torch.randint(0, 16, (192, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    ref = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.int(), 1)
    assert torch.equal(packing.pack_int4(codes, packing.native_layout()), ref)
    for layout in ("avx512", "scalar32"):  # the interleaved and the paired blocks
        assert torch.equal(packing.unpack_int4(packing.pack_int4(codes, layout), 192, 96, layout), codes)


def test_int8_codes_and_scales_equal_the_formula_in_chunks(monkeypatch):
    """Row chunks and the int32-view narrowing give round(w / scale) exactly, negative codes and zero rows too."""
    w = gaussian((300, 512), seed=5)
    w[3], w[5, :7] = 0.0, 1e-30
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-20).bfloat16()
    want = (w / scales.float()[:, None]).round_().clamp_(-127, 127).to(torch.int8)
    monkeypatch.setattr(kinds, "CHUNK", 7 * 512)  # chunks of 7 rows, a short last one
    for x in (w, w.T.contiguous().T):  # contiguous and transposed storage
        parts = quant.quantize(x, QFormat("int8"))
        assert torch.equal(parts["qweight"], want) and torch.equal(parts["scales"], scales)
    assert want.min() == -127 and want.max() == 127


def test_int4_kernel_dequant_convention():
    """Known answer: the kernel computes w = (q - 8) * scale + zero (exact with power-of-two scale and zero)."""
    N, K, G = 32, 64, 32
    codes = torch.arange(N * K).remainder(16).view(N, K).to(torch.uint8)
    qsz = torch.tensor([0.5, 1.0]).repeat(K // G, N, 1).bfloat16()       # scale 0.5, zero 1
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(torch.eye(K, dtype=torch.bfloat16),
                                                   packing.pack_int4(codes, packing.native_layout()), G, qsz)
    assert torch.equal(y.float().t(), (codes.float() - 8) * 0.5 + 1.0)


# ---- known answers ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,bits", [("int4", 4), ("int3", 3), ("int2", 2)])
def test_grid_weights_round_trip_exactly(kind, bits):
    """Weights already on a b-bit grid come back bit-exact, through storage, the int4 kernel and dequantize."""
    N, K, G = 48, 128, 32
    top = (1 << bits) - 1
    codes = torch.randint(0, top + 1, (N, K), generator=torch.Generator().manual_seed(bits))
    codes.view(N, K // G, G)[..., 0], codes.view(N, K // G, G)[..., 1] = 0, top   # every group spans the grid
    scale = 2.0 ** torch.randint(-8, -4, (N, K // G, 1), generator=torch.Generator().manual_seed(1))
    w = (codes.view(N, K // G, G) * scale - 3 * scale).view(N, K)
    fmt = QFormat(kind, G)
    parts = quant.quantize(w, fmt)
    assert torch.equal(quant.dequantize(parts, fmt, w.shape), w)
    assert torch.equal(quant.unpack_codes(parts, fmt, w.shape), codes.to(torch.uint8) + 8 - (1 << (bits - 1)))
    resident = quant.to_compute(parts, fmt, w.shape)
    y = quant.qlinear(torch.eye(K, dtype=torch.bfloat16), resident, fmt, w.shape)
    assert torch.equal(y.float().t(), w.bfloat16().float())


def test_ternary_known_answer_and_optimality():
    t = torch.randint(-1, 2, (32, 64), generator=torch.Generator().manual_seed(0))
    w = t * 2.0 ** torch.randint(-9, -3, (32, 1), generator=torch.Generator().manual_seed(1))  # exact in bf16
    parts = quant.quantize(w, QFormat("ternary"))
    assert torch.equal(quant.dequantize(parts, QFormat("ternary"), w.shape), w)
    assert torch.equal(quant.unpack_codes(parts, QFormat("ternary"), w.shape), t.to(torch.int8))
    g = gaussian((64, 512), seed=3)
    t, scale = ternarize(g)
    best = rel(t * scale[:, None], g)
    for c in (0.5, 0.7, 1.0):  # TWN's rule of thumb threshold c * mean|w| is never better than the exact search
        keep = g.abs() > c * g.abs().mean(1, keepdim=True)
        approx = torch.sign(g) * keep * ((g.abs() * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True))
        assert best <= rel(approx, g) + 1e-6


@pytest.mark.parametrize("zeros, entropy", [(80, 0.92), (90, 0.57)])
def test_sparse_ternary_keeps_each_rows_largest_at_the_target(zeros, entropy):
    """ternary-zNN: each row keeps its largest |w| with NN% of codes zero, at the best scale for that support
    (mean |w| over it), and decodes into the int4 kernel's layout exactly as dequantize reads it."""
    shape = (96, 256)
    w = gaussian(shape, seed=5)
    fmt = parse_format(f"ternary-z{zeros}")
    parts = quant.quantize(w, fmt)
    t = quant.unpack_codes(parts, fmt, shape)
    kept = t != 0
    assert sorted(t.unique().tolist()) == [-1, 0, 1] and torch.equal(t[kept].float(), torch.sign(w)[kept])
    assert kept.sum(1).eq(round((100 - zeros) / 100 * shape[1])).all()       # continuous weights: no ties
    a = w.abs()
    assert (a.masked_fill(~kept, float("inf")).amin(1) > a.masked_fill(kept, 0).amax(1)).all()
    assert torch.allclose(parts["scales"].float(), (a * kept).sum(1) / kept.sum(1), rtol=2**-8)
    dense = quant.dequantize(parts, fmt, shape)
    assert torch.equal(dense, t.float() * parts["scales"].float()[:, None])
    assert quant.entropy_bits(t) == pytest.approx(entropy, abs=0.02)
    assert rel(dense, w) > rel(quant.dequantize(quant.quantize(w, QFormat("ternary")), QFormat("ternary"), shape), w)
    resident = quant.to_compute(parts, fmt, shape)
    assert torch.equal(resident["qweight"], packing.pack_int4((t + 8).to(torch.uint8), packing.native_layout()))
    y = quant.qlinear(torch.eye(shape[1], dtype=torch.bfloat16), resident, fmt, shape)
    assert torch.equal(y.float().t(), dense.bfloat16().float())


# ---- contracts ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", FORMATS)
def test_layouts_match_tensors_and_out_is_filled_in_place(name, shape):
    fmt = parse_format(name)
    parts = quant.quantize(gaussian(shape), fmt)
    assert layout_of(parts) == quant.storage_layout(fmt, shape)
    spec = quant.compute_layout(fmt, shape, "cpu")
    sizes = [-(-torch.Size(s).numel() * dt.itemsize // 64) * 64 for _, s, dt in spec]
    buf = torch.full((sum(sizes),), 0xAB, dtype=torch.uint8)  # a slot: aligned views into one buffer
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    out = {n: buf[o:o + torch.Size(s).numel() * dt.itemsize].view(dt).view(s) for (n, s, dt), o in zip(spec, offsets)}
    got = quant.to_compute(parts, fmt, shape, "cpu", out=out)
    assert all(got[n] is out[n] for n in out)
    assert layout_of(got) == spec == layout_of(quant.to_compute(parts, fmt, shape, "cpu"))
    fresh = quant.to_compute(parts, fmt, shape, "cpu")
    assert all(torch.equal(fresh[n], got[n]) for n in out)
    assert all(fresh[n].data_ptr() != p.data_ptr() for n in fresh for p in parts.values())  # never aliases storage


def test_cuda_layout_is_dense_bf16():
    assert quant.compute_layout(QFormat("int4", 64), (64, 128), "cuda") == [("weight", (64, 128), torch.bfloat16)]
    assert quant.compute_layout(QFormat("ternary"), (64, 128), "cuda") == [("weight", (64, 128), torch.bfloat16)]
    assert quant.compute_layout(QFormat("fp32"), (64, 128), "cuda") == [("weight", (64, 128), torch.float32)]


def test_storage_is_compact():
    shape = (1024, 512)
    bits = {n: quant.bits_per_param(quant.quantize(gaussian(shape), parse_format(n)), shape)
            for n in ("int8", "int4", "int3", "int2", "ternary", "ternary-z90")}
    assert bits == pytest.approx({"int8": 8 + 16 / 512, "int4": 4.25, "int3": 3.25, "int2": 2.25,
                                  "ternary": 1.6 + 16 / 512, "ternary-z90": 1.6 + 16 / 512}, abs=1e-3)
    # ternary-zNN has ternary's raw codes: its size comes from the disk store's lzma (tests/test_store.py)
    parts = quant.quantize(gaussian(shape), QFormat("ternary"))
    assert 0.5 < quant.bits_per_param(parts, shape, lz4_level=0) < 1.7  # measured, not assumed
    assert 1.4 < quant.entropy_bits(quant.unpack_codes(parts, QFormat("ternary"), shape)) < 1.6


def test_non_canonical_cpu_layout_is_repacked(monkeypatch):
    """A CPU whose kernel blocks rows differently (AVX2, scalar builds) gets its own layout from to_compute."""
    shape = (96, 256)
    for name in ("int4", "int3", "ternary"):
        fmt = parse_format(name)
        parts = quant.quantize(gaussian(shape), fmt)
        monkeypatch.setattr(packing, "native_layout", lambda: packing.CANONICAL)  # whatever this CPU's kernel is
        canonical = quant.to_compute(parts, fmt, shape)["qweight"]
        monkeypatch.setattr(packing, "native_layout", lambda: "avx2")
        other = quant.to_compute(parts, fmt, shape)["qweight"]
        monkeypatch.undo()
        assert torch.equal(packing.unpack_int4(other, *shape, "avx2"), packing.unpack_int4(canonical, *shape))


def test_other_cpu_capabilities_in_subprocesses():
    """The real kernel under ATEN_CPU_CAPABILITY=avx2 and =default: detected layout, and qlinear == dequantize."""
    script = textwrap.dedent("""
        import torch, torch.nn.functional as F
        from offload.formats import packing, quant
        assert packing.native_layout() in packing.LAYOUTS
        w = torch.randn(96, 256) * 0.02
        for name in ("int4", "int3", "int2", "ternary"):
            fmt = quant.parse_format(name)
            parts = quant.quantize(w, fmt)
            x = torch.randn(3, 256).bfloat16()
            y = quant.qlinear(x, quant.to_compute(parts, fmt, w.shape), fmt, w.shape).float()
            ref = F.linear(x.float(), quant.dequantize(parts, fmt, w.shape))
            assert (y - ref).norm() / ref.norm() < 0.01, name
        print(packing.native_layout())
    """)
    root = Path(__file__).resolve().parents[2]
    procs = {cap: subprocess.Popen([sys.executable, "-c", script], cwd=root, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True,
                                   env={**os.environ, "ATEN_CPU_CAPABILITY": cap, "OMP_NUM_THREADS": "1"})
             for cap in ("avx2", "default")}
    layouts = {}
    for cap, p in procs.items():
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        layouts[cap] = out.strip()
    if layouts["avx2"] == packing.native_layout() == "avx2":  # a CPU without AVX2 ignores the request
        pytest.skip("no AVX2 on this CPU")
    assert layouts["default"] == "scalar32"


# ---- round trips --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", FORMATS)
def test_round_trip_error_and_qlinear(name, shape, dtype):
    fmt = parse_format(name)
    w = gaussian(shape, seed=shape[0], dtype=dtype)
    before = w.clone()
    parts = quant.quantize(w, fmt)
    assert torch.equal(w, before)  # pure: the input is untouched
    dense = quant.dequantize(parts, fmt, shape)
    assert dense.dtype == torch.float32 and dense.shape == shape
    assert rel(dense, w) <= (0.0 if fmt.dense and dtype == torch.bfloat16 else MAX_ERR[name])
    resident = quant.to_compute(parts, fmt, shape, "cpu")
    act = torch.float32 if name == "fp32" else torch.bfloat16
    for x in (torch.randn(1, shape[1]), torch.randn(5, shape[1]), torch.randn(2, 3, shape[1])):
        x = x.to(act)
        y = quant.qlinear(x, resident, fmt, shape)
        assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], shape[0])
        assert rel(y, F.linear(x.float(), dense)) < (1e-5 if name == "fp32" else 0.01)


def test_int3_int2_codes_are_the_quantizer_codes():
    """Bit-packing int3/int2 into planes and expanding them through the kernel layout loses nothing."""
    w = gaussian((96, 256), seed=7)
    for kind, bits in (("int3", 3), ("int2", 2)):
        ref, _ = quantize_groups(w, bits, 64, shrinks(bits, 64, "fast"))
        got = quant.unpack_codes(quant.quantize(w, QFormat(kind, 64)), QFormat(kind, 64), w.shape)
        assert got.max() <= 8 + (1 << (bits - 1)) - 1 and got.min() >= 8 - (1 << (bits - 1))
        assert torch.equal(got, ref + 8 - (1 << (bits - 1)))


# ---- adaptive group size --------------------------------------------------------------------------------

def test_adaptive_group_size_finds_outlier_columns():
    w = gaussian((256, 1024), seed=11)
    assert quant.choose_group_size(w, 4) == 128
    assert quant.choose_group_size(torch.stack([w, w]), 4) == 128        # stacked experts [E, N, K]
    spiky = w.clone()
    spiky[:, torch.randperm(1024, generator=torch.Generator().manual_seed(0))[:3]] *= 12  # 3 outlier input features
    g = quant.choose_group_size(spiky, 4)
    assert g < 128
    err = {G: rel(quant.dequantize(quant.quantize(spiky, QFormat("int4", G)), QFormat("int4", G), spiky.shape), spiky)
           for G in (g, 128)}
    assert err[g] < err[128]
    assert quant.choose_group_size(w[:, :96], 4) == 32                   # only 32 divides K=96
    fmt = quant.resolve_format(parse_format("int4-adaptive"), spiky)
    assert fmt == QFormat("int4", g)
    assert quant.resolve_format(QFormat("int8"), spiky) == QFormat("int8")


def test_adaptive_group_size_errors():
    w = gaussian((32, 128))
    with pytest.raises(FormatError, match="group size candidates"):
        quant.choose_group_size(w, 4, candidates=(48,))
    with pytest.raises(FormatError, match="2-4 bit"):
        quant.choose_group_size(w, 8)
    with pytest.raises(FormatError, match="divides in_features K=80"):
        quant.choose_group_size(gaussian((32, 80)), 4, candidates=(64, 128))


# ---- formats and their errors -------------------------------------------------------------------------

def test_parse_format():
    assert parse_format("int4") == QFormat("int4", 128)
    assert parse_format(" INT4-g64 ") == QFormat("int4", 64)
    assert parse_format("int2-adaptive") == QFormat("int2", 0) and parse_format("int2-adaptive").adaptive
    assert parse_format("ternary") == QFormat("ternary") and parse_format("int8") == QFormat("int8")
    assert parse_format("ternary-z80") == QFormat("ternary", zeros=80) and parse_format("ternary-z80").entropy_coded
    assert not parse_format("ternary").entropy_coded
    for name in FORMATS + ["int3-adaptive"]:
        assert parse_format(str(parse_format(name))) == parse_format(name)


@pytest.mark.parametrize("text,match", [
    ("int5", "unknown weight format 'int5'.*e.g. 'int4-g64'"),
    ("int4-g48", "group size must be one of"),
    ("int4-g", "unknown weight format"),
    ("int8-g64", "int8 takes no group size"),
    ("ternary-adaptive", "ternary takes no group size"),
    ("int4-z80", "applies to ternary only.*'ternary-z80'"),
    ("ternary-z0", "unknown weight format.*ternary-z80"),
    ("ternary-z100", "unknown weight format"),
    ("int8-search", "int8 takes no group size or clip search"),
    ("int4-search-g32", "unknown weight format.*then optionally -search"),
])
def test_parse_format_errors(text, match):
    with pytest.raises(FormatError, match=match):
        parse_format(text)


def test_qformat_validation_and_shape_errors():
    with pytest.raises(FormatError, match="unknown weight format kind 'int6'"):
        QFormat("int6")
    with pytest.raises(FormatError, match="int8 takes no group size"):
        QFormat("int8", 64)
    with pytest.raises(FormatError, match="clip must be one of fast, search, minmax, got 'exact'"):
        QFormat("int4", 32, clip="exact")
    with pytest.raises(FormatError, match="applies to int4/int3/int2 only, got ternary"):
        QFormat("ternary", clip="search")
    with pytest.raises(FormatError, match=r"resolve_format"):
        quant.storage_layout(QFormat("int4"), (64, 128))
    with pytest.raises(FormatError, match=r"divisible by 16.*int8/bf16"):
        quant.quantize(gaussian((40, 128)), QFormat("int4", 32))
    with pytest.raises(FormatError, match=r"in_features by 128"):
        quant.storage_layout(QFormat("int3", 128), (64, 96))
    assert issubclass(FormatError, OffloadError) and issubclass(FormatError, ValueError)


# ---- GPU -------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_resident_is_dense_and_agrees_with_cpu():
    shape = (96, 256)
    w = gaussian(shape)
    for name in FORMATS:
        fmt = parse_format(name)
        parts = {k: v.pin_memory() for k, v in quant.quantize(w, fmt).items()}
        resident = quant.to_compute(parts, fmt, shape, "cuda")
        assert layout_of(resident) == quant.compute_layout(fmt, shape, "cuda")
        assert all(t.device.type == "cuda" for t in resident.values())
        dense = quant.dequantize(parts, fmt, shape)
        assert torch.equal(quant.dequantize({k: v.cuda() for k, v in parts.items()}, fmt, shape).cpu(), dense)
        act = torch.float32 if name == "fp32" else torch.bfloat16
        x = torch.randn(4, shape[1]).to(act)
        y = quant.qlinear(x.cuda(), resident, fmt, shape)
        assert y.device.type == "cuda" and y.dtype == act
        assert rel(y.cpu(), F.linear(x.float(), dense)) < (1e-4 if name == "fp32" else 0.01)


def test_a_group_that_does_not_divide_the_experts_names_one_that_does():
    from offload.formats.record import RecordCodec, format_rule
    from offload.store.layout import ExpertLayout, TensorSpec

    def codec(K: int, bits: str) -> RecordCodec:
        dense = ExpertLayout((TensorSpec("gate_up", (64, K), torch.bfloat16), TensorSpec("down", (K, 32), torch.bfloat16)))
        return RecordCodec(dense, format_rule(bits), False, torch.device("cpu"))

    with pytest.raises(OffloadError, match=r"divisible by its group size; use int4-g32$"):
        codec(96, "int4-g64").record_bytes
    with pytest.raises(OffloadError, match=r"no group size divides them: use int8$"):
        codec(48, "int4-g32").record_bytes
