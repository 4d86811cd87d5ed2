"""offload-export: GPTQ read back by a reader written from the format's spec, compressed-tensors loaded back through
transformers' own quantizer integration (compressed-tensors package, CPU) and compared with our engine."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from offload.export import QMatrix, export
from offload.export.cli import export_app
from offload.formats.quant import parse_format
from offload.store.convert import build_store
from offload.store.disk import DiskStore

ARCHS = ("mixtral", "qwen3_moe")
EXPERT = {"mixtral": ("block_sparse_moe.experts", ("w1", "w3", "w2")),
          "qwen3_moe": ("mlp.experts", ("gate_proj", "up_proj", "down_proj"))}


SIZES = {"mixtral": {}, "qwen3_moe": {"moe_intermediate_size": 64}}  # int4-g32 needs every K divisible by 32


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """stores(arch, bits) -> (fp32 checkpoint dir, store dir), built and converted once per module."""
    from tiny_models import build

    models, made = {}, {}

    def get(arch: str, bits: str):
        if arch not in models:
            models[arch] = build(arch, tmp_path_factory.mktemp(arch), dtype=torch.float32, **SIZES[arch])
        if (arch, bits) not in made:
            model = models[arch]
            store = tmp_path_factory.mktemp(f"{arch}-{bits}")
            build_store(model, store, bits=bits, progress=False)
            made[(arch, bits)] = (model, store)
        return made[(arch, bits)]

    return get


def load_all(directory) -> dict[str, torch.Tensor]:
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    out = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(directory / shard, "pt") as f:
            out.update({n: f.get_tensor(n) for n in f.keys()})
    assert set(out) == set(index["weight_map"])
    return out


def store_matrices(model, store, arch) -> dict[str, tuple[QMatrix, torch.Tensor]]:
    """Checkpoint module name of every expert linear -> (its QMatrix in the store, our dequantized fp32 weight)."""
    prefix, (gate, up, down) = EXPERT[arch]
    disk = DiskStore(store, direct=False)
    buf = torch.empty(disk.record_bytes, dtype=torch.uint8)
    out = {}
    for layer, e in disk.keys():
        disk.read_into((layer, e), buf)
        views = disk.layout_of((layer, e)).views(buf)
        fmt = parse_format(disk.format_of((layer, e)).split("/")[0])
        parts = {m: {n.split(".", 1)[1]: t.clone() for n, t in views.items() if n.startswith(m + ".")}
                 for m in ("gate_up", "down")}
        n2, h = parts["gate_up"]["qweight"].shape[0], views["down.qweight"].shape[0]
        gu = QMatrix.from_parts(fmt, parts["gate_up"], n2, h)
        dn = QMatrix.from_parts(fmt, parts["down"], h, n2 // 2)
        base = f"model.layers.{layer}.{prefix}.{e}"
        for role, m in ((gate, gu.rows(0, n2 // 2)), (up, gu.rows(n2 // 2, n2)), (down, dn)):
            out[f"{base}.{role}"] = (m, m.dequantize())
    disk.close()
    return out


def read_gptq(tensors: dict[str, torch.Tensor], bits: int) -> dict[str, torch.Tensor]:
    """Every GPTQ linear dequantized from its published spec: qweight int32 [K*b/32, N] packed along K, qzeros int32
    [groups, N*b/32] holding zero point - 1 packed along N, scales [groups, N], g_idx [K]; w = (q - z) * s."""
    per, mask = 32 // bits, (1 << bits) - 1
    shifts = torch.arange(per, dtype=torch.int64) * bits
    out = {}
    for name in (n for n in tensors if n.endswith(".qweight")):
        module = name.removesuffix(".qweight")
        qw, qz = tensors[name].to(torch.int64), tensors[module + ".qzeros"].to(torch.int64)
        q = ((qw[:, None, :] >> shifts[None, :, None]) & mask).reshape(-1, qw.shape[1])           # [K, N]
        z = (((qz[:, :, None] >> shifts[None, None, :]) & mask) + 1).reshape(qz.shape[0], -1)     # [groups, N]
        g = tensors[module + ".g_idx"].long()
        s = tensors[module + ".scales"].float()
        out[module] = ((q - z[g]).float() * s[g]).t()
    return out


def check_dense_copied(model, tensors):
    """Every non-expert checkpoint tensor is in the export unchanged (name, dtype, values)."""
    copied = 0
    for f in sorted(model.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            for n in st.keys():
                if ".experts." not in n:
                    t = st.get_tensor(n)
                    assert tensors[n].dtype == t.dtype and torch.equal(tensors[n], t), n
                    copied += 1
    assert copied > 10


@pytest.mark.parametrize("arch", ARCHS)
def test_gptq_int8_reads_back_bit_exact(arch, stores, tmp_path):
    from transformers import GPTQConfig

    model, store = stores(arch, "int8")
    result = export(store, tmp_path / "out", "gptq", model=model, progress=False)
    assert result.deviation.max_abs == 0
    tensors = load_all(tmp_path / "out")
    got = read_gptq(tensors, 8)
    want = store_matrices(model, store, arch)
    assert set(got) == set(want) and len(got) == 3 * 24
    for module, (_m, w) in want.items():
        assert torch.equal(got[module], w), module
    check_dense_copied(model, tensors)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    parsed = GPTQConfig.from_dict(cfg)
    assert (parsed.bits, parsed.group_size, parsed.sym, parsed.desc_act, parsed.format) == (8, -1, True, False, "gptq")


@pytest.mark.parametrize("arch", ARCHS)
def test_gptq_int4_moves_each_zero_to_the_nearest_integer_zero_point(arch, stores, tmp_path):
    """Our float zero per group cannot be exact in GPTQ: the reader sees w' = (q' - zp) * s with zp = round(8 - z/s);
    where zp needed no clamping the codes are ours and each group moves by a constant under half a step."""
    model, store = stores(arch, "int4-g32")
    result = export(store, tmp_path / "out", "gptq", model=model, progress=False)
    tensors = load_all(tmp_path / "out")
    got = read_gptq(tensors, 4)
    err_sq = ref_sq = 0.0
    for module, (m, w) in store_matrices(model, store, arch).items():
        N, K = w.shape
        s, exact_zp = m.scale.float(), 8 - m.zero.float() / m.scale.float()                 # [N, K/32]
        d = (got[module] - w).view(N, K // 32, 32)
        inside = (exact_zp.round() >= 1) & (exact_zp.round() <= 15)
        shift = (exact_zp.round() - exact_zp) * s                                          # expected move per group
        untied = inside & (exact_zp - exact_zp.floor() != 0.5)  # a tie rounds each weight to either neighbour
        assert torch.allclose(d[untied], -shift[untied][:, None].expand(-1, 32), atol=1e-6), module
        assert (d.abs().amax(-1)[inside] <= 0.5 * s[inside] + 1e-6).all()
        err_sq += float((got[module] - w).square().sum())
        ref_sq += float(w.square().sum())
    assert result.deviation.relative_rms == pytest.approx((err_sq / ref_sq) ** 0.5, rel=1e-4)
    assert 0 < result.deviation.relative_rms < 0.2
    assert "relative RMS" in result.summary()
    check_dense_copied(model, tensors)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert (cfg["bits"], cfg["group_size"], cfg["sym"]) == (4, 32, False)


@pytest.mark.parametrize("arch", ARCHS)
def test_compressed_tensors_int8_loads_in_transformers_and_matches_the_engine(arch, stores, tmp_path):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from offload.model import OffloadedModel

    model, store = stores(arch, "int8")
    out = tmp_path / "out"
    assert export(store, out, "compressed-tensors", model=model, progress=False).deviation.max_abs == 0
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    ct = QuantizationConfig.model_validate(cfg)
    CompressedTensorsConfig.from_dict(cfg)
    scheme = ct.config_groups["group_0"]
    compressor = BaseCompressor.get_value_from_registry(ct.format)
    tensors = load_all(out)
    want = store_matrices(model, store, arch)
    for module, (_m, w) in want.items():  # the library's own decompressor computes in the scale dtype (bf16)
        state = {k: tensors[f"{module}.{k}"] for k in ("weight_packed", "weight_scale", "weight_shape")}
        assert torch.equal(compressor.decompress(state, scheme)["weight"], w.to(torch.bfloat16)), module
    check_dense_copied(model, tensors)

    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    prefix, (gate, up, down) = EXPERT[arch]
    for layer, block in enumerate(hf.model.layers):
        experts = block.mlp.experts
        for e in range(8):
            base = f"model.layers.{layer}.{prefix}.{e}"
            gu = torch.cat([want[f"{base}.{gate}"][1], want[f"{base}.{up}"][1]]).to(torch.bfloat16)
            assert torch.equal(experts.gate_up_proj[e], gu) and torch.equal(experts.down_proj[e],
                                                                            want[f"{base}.{down}"][1].bfloat16())
    ours = OffloadedModel.from_pretrained(model, store="disk", store_dir=store, bits="int8", dtype="bfloat16")
    ids = torch.randint(3, 90, (1, 16), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        got, ref = hf(ids).logits.float(), ours(ids).logits.float()
    ours.close()
    cos = torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0)
    assert cos > 0.999, f"transformers on the export disagrees with the engine on the store (cosine {cos:.5f})"


def test_shards_index_atomic_rename_and_tokenizer(stores, tmp_path):
    model, store = stores("mixtral", "int4-g32")
    out = tmp_path / "out"
    result = export(model, out, "gptq", store=store, max_shard_bytes=64 << 10, progress=False)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert result.shards == len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in load_all(out).values())
    assert not (tmp_path / "out.partial").exists()
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (model / name).read_bytes()
    assert not list(out.glob("*.tmp"))


def run_cli(*args):
    result = CliRunner().invoke(export_app, [str(a) for a in args])
    lines = [line for line in result.output.splitlines() if line.strip()]
    return result.exit_code, lines


def test_bad_inputs_get_one_line_and_exit_2(stores, tiny_dir, tmp_path, tmp_path_factory):
    from tiny_models import build

    model, store4 = stores("mixtral", "int4-g32")
    _, store8 = stores("mixtral", "int8")
    other = build("mixtral", tmp_path_factory.mktemp("other"), dtype=torch.float32, seed=1)
    ternary, int3 = tmp_path / "ternary", tmp_path / "int3"
    build_store(model, ternary, bits="ternary", progress=False)
    build_store(model, int3, bits="int3-g32", progress=False)
    (tmp_path / "exists").mkdir()
    cases = [
        ((tmp_path, "--out", tmp_path / "o", "--format", "gptq"), "neither a converted store"),
        ((store4, "--out", tmp_path / "o", "--format", "gptq"), "--model MODEL_DIR"),
        ((model, "--out", tmp_path / "o", "--format", "gptq"), "--store STORE_DIR"),
        ((model, "--store", model, "--out", tmp_path / "o", "--format", "gptq"), "offload-convert"),
        ((store4, "--model", other, "--out", tmp_path / "o", "--format", "gptq"), "was not converted from"),
        ((ternary, "--model", model, "--out", tmp_path / "o", "--format", "gptq"), "--bits int4-g128"),
        ((int3, "--model", model, "--out", tmp_path / "o", "--format", "gptq"), "not int3-g32"),
        ((store4, "--model", model, "--out", tmp_path / "o", "--format", "compressed-tensors"), "--format gptq"),
        ((store8, "--model", model, "--out", tmp_path / "o", "--format", "gguf"), "compressed-tensors, gptq"),
        ((store8, "--model", model, "--out", tmp_path / "exists", "--format", "gptq"), "already exists"),
        ((store8, "--model", tiny_dir("gpt_oss", torch.float32), "--out", tmp_path / "o", "--format", "gptq"),
         "fused"),
    ]
    for args, fix in cases:
        code, lines = run_cli(*args)
        assert code == 2 and len(lines) == 1 and fix in lines[0] and lines[0].startswith("error:"), (args, lines)
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_cli_prints_the_summary(stores, tmp_path):
    model, store = stores("qwen3_moe", "int8")
    code, lines = run_cli(store, "--model", model, "--out", tmp_path / "o", "--format", "compressed-tensors")
    assert code == 0 and "24 experts as compressed-tensors int8" in lines[-1] and "bit-identical" in lines[-1]
