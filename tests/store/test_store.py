"""The disk store: atomic, checksummed, resumable, and refuses a store made from something else."""
from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch

from offload import OffloadedModel, OffloadError
from offload.store.arch import ARCHS
from offload.cli.common import DEMO_MODEL
from offload.formats.record import RecordCodec, format_rule
from offload.store.convert import JOURNAL, PARTIAL, build_store, convert
from offload.store.source import CheckpointSource
from offload.store.disk import ALIGN, ALIGN_MIN, DATA, INDEX, DiskStore, RamStore, aligned_buffer
from tiny_models import fine_tune


def source_of(path, arch="mixtral", dtype=torch.bfloat16):
    return CheckpointSource(path, ARCHS[arch], 8, dtype)


def codec_of(src, bits):
    """The record codec of a quantized store (None: dense records)."""
    return bits and RecordCodec(src.layout, format_rule(bits), src.arch.transposed, torch.device("cpu"))


def digest(store_dir):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(store_dir.iterdir())}


def test_records_round_trip_against_checkpoint(tiny_dir, tmp_path):
    src = source_of(tiny_dir("mixtral"))
    convert(src, tmp_path / "s", {"format": "dense"}, progress=False)
    store, ram = DiskStore(tmp_path / "s"), RamStore(src)
    a = torch.empty(store.record_bytes, dtype=torch.uint8)
    b = torch.empty(store.record_bytes, dtype=torch.uint8)
    assert set(store.keys()) == set(src.keys()) and len(store.keys()) == 24
    for key in src.keys():
        store.read_into(key, a)
        ram.read_into(key, b)
        assert torch.equal(a, b)
        views = store.layout_of(key).views(a)
        want = src.read(key)
        for name, t in want.items():
            assert torch.equal(views[name], t)
    assert not (tmp_path / "s" / JOURNAL).exists() and not (tmp_path / "s" / PARTIAL).exists()


def test_flipped_byte_is_caught_with_file_and_key(tiny_dir, tmp_path):
    src = source_of(tiny_dir("mixtral"))
    convert(src, tmp_path / "s", {"format": "dense"}, progress=False)
    data = tmp_path / "s" / DATA
    raw = bytearray(data.read_bytes())
    store = DiskStore(tmp_path / "s")
    raw[store.extent(src.keys()[5])[0] + 17] ^= 0xFF
    data.write_bytes(bytes(raw))
    store = DiskStore(tmp_path / "s")
    buf = torch.empty(store.record_bytes, dtype=torch.uint8)
    store.read_into(src.keys()[4], buf)  # neighbours are fine
    with pytest.raises(OffloadError, match=r"checksum mismatch in .*experts.bin for expert \(0, 5\)"):
        store.read_into(src.keys()[5], buf)


def test_corrupt_store_surfaces_during_generation(tiny_dir, tmp_path):
    path = tiny_dir("mixtral")
    m = OffloadedModel.from_pretrained(path, store="disk", store_dir=tmp_path / "s")
    m.close()
    data = tmp_path / "s" / DATA
    data.write_bytes(bytes(b ^ 0x55 for b in data.read_bytes()))
    m = OffloadedModel.from_pretrained(path, store="disk", store_dir=tmp_path / "s")
    with pytest.raises(OffloadError, match="checksum mismatch"):
        m.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2)


@pytest.mark.parametrize("arch, bits", [("qwen3_moe", None), ("mixtral", "ternary-z90"), ("mixtral", "int3-g32")])
def test_interrupted_conversion_resumes_byte_identical(tiny_dir, tmp_path, monkeypatch, arch, bits):
    """Fixed-size raw records (dense, int3), and variable-length lzma ones: a killed conversion resumes to the same
    bytes as an uninterrupted one (so two conversions are byte-identical)."""
    src = source_of(tiny_dir(arch), arch)
    codec, settings = codec_of(src, bits), {"format": bits or "dense"}
    convert(src, tmp_path / "clean", settings, codec, progress=False)
    calls = {"n": 0}
    real_read = CheckpointSource.read_into

    def dying_read(self, key, views):
        calls["n"] += 1
        if calls["n"] == 11:
            raise KeyboardInterrupt  # killed mid-way
        return real_read(self, key, views)

    monkeypatch.setattr(CheckpointSource, "read_into", dying_read)
    monkeypatch.setattr("offload.store.convert.time.monotonic", iter(range(0, 10**6, 2)).__next__)  # journal every record
    with pytest.raises(KeyboardInterrupt):
        convert(src, tmp_path / "resumed", settings, codec, progress=False)
    assert not (tmp_path / "resumed" / INDEX).exists(), "an interrupted store must not look valid"
    journal = json.loads((tmp_path / "resumed" / JOURNAL).read_text())
    assert len(journal["records"]) == 10
    lengths = {r[5] for r in journal["records"]}
    assert len(lengths) == 1 if bits != "ternary-z90" else (len(lengths) > 1 and {r[6] for r in journal["records"]} == {"lzma"})
    # garbage after the journalled records (a half-written record) must be discarded on resume
    with open(tmp_path / "resumed" / PARTIAL, "ab") as f:
        f.write(b"\x01" * 100)
    monkeypatch.setattr(CheckpointSource, "read_into", real_read)
    convert(src, tmp_path / "resumed", settings, codec, progress=False)
    assert digest(tmp_path / "resumed") == digest(tmp_path / "clean")


def test_store_made_with_other_settings_is_refused(tiny_dir, tmp_path):
    a = tiny_dir("mixtral")
    OffloadedModel.from_pretrained(a, store="disk", store_dir=tmp_path / "s").close()
    with pytest.raises(OffloadError, match="was made with dtype"):
        OffloadedModel.from_pretrained(a, store="disk", store_dir=tmp_path / "s", dtype="float32")


def test_store_is_reused_not_rewritten(tiny_dir, tmp_path):
    path = tiny_dir("mixtral")
    OffloadedModel.from_pretrained(path, store="disk", store_dir=tmp_path / "s").close()
    before = (tmp_path / "s" / DATA).stat().st_mtime_ns
    OffloadedModel.from_pretrained(path, store="disk", store_dir=tmp_path / "s").close()
    assert (tmp_path / "s" / DATA).stat().st_mtime_ns == before


def test_truncated_data_file_is_named(tiny_dir, tmp_path):
    OffloadedModel.from_pretrained(tiny_dir("mixtral"), store="disk", store_dir=tmp_path / "s").close()
    with open(tmp_path / "s" / DATA, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(OffloadError, match="missing or truncated"):
        DiskStore(tmp_path / "s")


def test_lz4_only_where_it_pays_and_round_trips(tiny_dir, tmp_path):
    """Sparse records compress and are flagged; dense random ones are stored raw. Both read back exactly."""
    src = source_of(tiny_dir("mixtral"))
    real_read = src.read

    def sparse_every_other(key):  # half the experts 90% zeros, as pruned or ternary-like weights are
        t = real_read(key)
        if key[1] % 2 == 0:
            g = torch.Generator().manual_seed(key[0] * 100 + key[1])
            t = {n: torch.where(torch.rand(v.shape, generator=g) < 0.9, torch.zeros_like(v), v) for n, v in t.items()}
        return t

    src.read_into = lambda key, views: [v.copy_(sparse_every_other(key)[n]) for n, v in views.items()]
    convert(src, tmp_path / "s", {"format": "dense"}, progress=False)
    store = DiskStore(tmp_path / "s")
    assert [store.codec_of(k) for k in src.keys()] == ["lz4" if k[1] % 2 == 0 else None for k in src.keys()]
    assert (tmp_path / "s" / DATA).stat().st_size == sum(store.extent(k)[1] for k in src.keys())  # no padding
    got, want = (torch.empty(store.record_bytes, dtype=torch.uint8) for _ in range(2))
    for key in src.keys():
        store.read_into(key, got)
        src.layout.pack(sparse_every_other(key), want)
        assert torch.equal(got, want), key


def test_lzma_records_round_trip_and_a_flipped_byte_is_caught(tiny_dir, tmp_path):
    """ternary-z90 records are stored lzma-coded, back to back, and read back as the encoder's exact bytes."""
    src = source_of(tiny_dir("mixtral"))
    codec = codec_of(src, "ternary-z90")
    convert(src, tmp_path / "s", {"format": "ternary-z90"}, codec, progress=False)
    store = DiskStore(tmp_path / "s")
    got, want = (torch.zeros(store.record_bytes, dtype=torch.uint8) for _ in range(2))
    end = 0
    for key in src.keys():
        _kind, layout, tensors = codec.encode(key, src.read(key))
        layout.pack(tensors, want[: layout.nbytes])
        assert store.read_into(key, got) == store.extent(key)[1] < 0.6 * layout.nbytes
        assert torch.equal(got[: layout.nbytes], want[: layout.nbytes]), key
        assert store.codec_of(key) == "lzma" and store.extent(key)[0] == end
        end = sum(store.extent(key))
    assert (tmp_path / "s" / DATA).stat().st_size == end
    data = tmp_path / "s" / DATA
    raw = bytearray(data.read_bytes())
    offset, length = store.extent(src.keys()[5])
    raw[offset + length // 2] ^= 0x01
    data.write_bytes(bytes(raw))
    store = DiskStore(tmp_path / "s")
    store.read_into(src.keys()[6], got)  # neighbours are fine
    with pytest.raises(OffloadError, match=r"checksum mismatch in .*experts.bin for expert \(0, 5\)"):
        store.read_into(src.keys()[5], got)


def test_direct_reads_equal_buffered_reads_into_any_buffer(tmp_path):
    """The demo's dense store: every long record starts on an ALIGN boundary and is read with O_DIRECT straight
    into an aligned slot (no bounce buffer), or through the bounce buffer into an unaligned one; both equal
    buffered reads byte for byte."""
    build_store(DEMO_MODEL, tmp_path / "s", progress=False)
    direct, buffered = DiskStore(tmp_path / "s"), DiskStore(tmp_path / "s", direct=False)
    assert direct.direct and not buffered.direct
    keys, n = direct.keys(), direct.record_bytes
    assert n >= ALIGN_MIN and all(direct.extent(k)[0] % ALIGN == 0 for k in keys)
    assert direct.buffer_bytes % ALIGN == 0 and direct.buffer_bytes - n < ALIGN
    slot, ref = aligned_buffer(direct.buffer_bytes), torch.empty(n, dtype=torch.uint8)
    odd = torch.empty(n + 1, dtype=torch.uint8)[1:]  # not aligned
    for k in keys:
        buffered.read_into(k, ref)
        assert direct.read_into(k, slot) == n
        assert getattr(direct._local, "bounce", None) is None, "an aligned slot must not need the bounce buffer"
        assert torch.equal(slot[:n], ref)
    for k in keys:
        buffered.read_into(k, ref)
        direct.read_into(k, odd)
        assert torch.equal(odd, ref)


def test_small_and_compressed_records_read_directly_through_the_bounce_buffer(tiny_dir, tmp_path):
    """Records below ALIGN_MIN stay packed back to back (no padding), and direct reads still equal buffered ones."""
    src = source_of(tiny_dir("mixtral"))
    convert(src, tmp_path / "s", {"format": "ternary-z90"}, codec_of(src, "ternary-z90"), progress=False)
    direct, buffered = DiskStore(tmp_path / "s"), DiskStore(tmp_path / "s", direct=False)
    extents = sorted(direct.extent(k) for k in direct.keys())
    assert all(o + n == o2 for (o, n), (o2, _) in zip(extents, extents[1:])), "small records are not padded"
    a, b = aligned_buffer(direct.buffer_bytes), aligned_buffer(direct.buffer_bytes)
    for k in direct.keys():
        direct.read_into(k, a)
        buffered.read_into(k, b)
        assert torch.equal(a[: direct.record_bytes], b[: direct.record_bytes])


def test_ternary_z90_store_is_below_one_bit_per_param_on_disk(tmp_path):
    """Measured from the files (index + data) of the demo model's store, not from the format's arithmetic."""
    build_store(DEMO_MODEL, tmp_path / "s", bits="ternary-z90", progress=False)
    store = DiskStore(tmp_path / "s")
    params = 64 * 3 * 256 * 288  # 4 layers x 16 experts of gate, up, down
    size = sum((tmp_path / "s" / name).stat().st_size for name in (INDEX, DATA))
    assert len(store.keys()) == 64 and all(store.codec_of(k) == "lzma" for k in store.keys())
    assert 0.55 < 8 * size / params < 1.0


def test_full_disk_while_converting_is_one_line_and_not_valid(tiny_dir, tmp_path, monkeypatch):
    import builtins
    import errno

    real_open = builtins.open

    class Full:
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, data):
            self.n += 1
            if self.n > 5:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

    def fake_open(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        return Full(f) if str(path).endswith(PARTIAL) else f

    monkeypatch.setattr(builtins, "open", fake_open)
    with pytest.raises(OffloadError, match="disk full while writing the expert store"):
        convert(source_of(tiny_dir("mixtral")), tmp_path / "s", {"format": "dense"}, progress=False)
    monkeypatch.setattr(builtins, "open", real_open)
    assert not (tmp_path / "s" / INDEX).exists()
    with pytest.raises(OffloadError, match="cannot read expert store index"):
        DiskStore(tmp_path / "s")


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss", "qwen2_moe"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_ram_store_preads_into_the_record_exactly_as_read_and_pack(tiny_dir, arch, dtype):
    """The RAM tier's direct pread (same dtype) and its convert fallback (other dtype) give the record that
    `read` + `pack` gives, for split (gate/up) and fused checkpoints."""
    src = source_of(tiny_dir(arch), arch, dtype)
    store = RamStore(src)
    for key in src.keys()[::5]:
        want = torch.zeros(store.record_bytes, dtype=torch.uint8)
        src.layout.pack(src.read(key), want)
        got = torch.full((store.record_bytes + 7,), 0xAB, dtype=torch.uint8)  # a slot may be larger
        assert store.read_into(key, got) == store.record_bytes * 2 // dtype.itemsize  # the bf16 checkpoint's bytes
        views = src.layout.views(got[: store.record_bytes])
        for name, ref in src.layout.views(want).items():
            assert torch.equal(views[name], ref), (key, name)


# --- identity: a store serves only the experts it was converted from --------------------------------
def test_store_of_the_demo_is_refused_for_its_fine_tune(tmp_path):
    build_store(DEMO_MODEL, tmp_path / "s", progress=False)
    tuned = fine_tune(DEMO_MODEL, tmp_path / "tuned")
    with pytest.raises(OffloadError, match=r"different checkpoint .*store_dir.* reconvert") as e:
        OffloadedModel.from_pretrained(tuned, store="disk", store_dir=tmp_path / "s")
    assert "\n" not in str(e.value)
    with pytest.raises(OffloadError, match="different checkpoint"):
        build_store(tuned, tmp_path / "s", progress=False)


@pytest.mark.parametrize("arch", ["gpt_oss", "qwen3_moe"])  # fused [E, ...] tensors, and one tensor per expert
def test_one_changed_expert_changes_the_fingerprint(tiny_dir, tmp_path, arch):
    from safetensors.torch import load_file, save_file

    src = source_of(tiny_dir(arch), arch)
    shutil.copytree(tiny_dir(arch), tmp_path / "m")
    f = next((tmp_path / "m").glob("*.safetensors"))
    tensors = load_file(f)
    name = next(n for n in sorted(tensors) if ".experts." in n and n.endswith(("down_proj", "down_proj.weight")))
    t = tensors[name]
    row = t[5] if t.dim() == 3 else t  # expert 5 of a fused tensor, or the tensor of one expert
    row.view(-1)[row.numel() // 2] += 1.0  # one value in the middle
    save_file(tensors, f, metadata={"format": "pt"})
    assert source_of(tmp_path / "m", arch).fingerprint() != src.fingerprint()


def test_non_expert_changes_keep_the_store(tiny_dir, tmp_path):
    """The store holds experts only: another norm epsilon or attention weight reuses it, unconverted."""
    from safetensors.torch import load_file, save_file

    a = tiny_dir("mixtral")
    OffloadedModel.from_pretrained(a, store="disk", store_dir=tmp_path / "s").close()
    before = (tmp_path / "s" / DATA).stat().st_mtime_ns
    other = tmp_path / "other"
    shutil.copytree(a, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-5
    (other / "config.json").write_text(json.dumps(cfg))
    f = next(other.glob("*.safetensors"))
    tensors = load_file(f)
    tensors["model.layers.0.self_attn.q_proj.weight"] += 1.0
    save_file(tensors, f, metadata={"format": "pt"})
    OffloadedModel.from_pretrained(other, store="disk", store_dir=tmp_path / "s").close()
    assert (tmp_path / "s" / DATA).stat().st_mtime_ns == before


def test_store_of_an_older_version_is_refused_with_the_fix(tiny_dir, tmp_path):
    path = tiny_dir("mixtral")
    OffloadedModel.from_pretrained(path, store="disk", store_dir=tmp_path / "s").close()
    index = json.loads((tmp_path / "s" / INDEX).read_text())
    index["version"] = 2
    del index["fingerprint"]
    (tmp_path / "s" / INDEX).write_text(json.dumps(index))
    with pytest.raises(OffloadError, match=r"version 2.*delete .* reconvert"):
        OffloadedModel.from_pretrained(path, store="disk", store_dir=tmp_path / "s")


def count_preads(monkeypatch) -> list[int]:
    import os

    reads: list[int] = []
    real = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, offset: reads.append(n) or real(fd, n, offset))
    return reads


def test_fingerprint_reads_a_few_kib_per_expert_tensor(monkeypatch):
    """Cheap enough for every open: the demo's 192 expert tensors, three 4 KiB preads each, whatever their size."""
    reads = count_preads(monkeypatch)
    CheckpointSource(DEMO_MODEL, ARCHS["qwen3_moe"], 16, torch.bfloat16).fingerprint()
    assert len(reads) == 3 * 3 * 64 and max(reads) <= 4096


def test_fingerprint_of_many_tensors_stays_within_its_reads(tiny_dir, tmp_path, monkeypatch):
    """More expert tensors than MAX_SAMPLES (fine-grained MoEs): at most that many reads, and a fine-tune is
    still told apart."""
    import offload.store.source as source

    monkeypatch.setattr(source, "MAX_SAMPLES", 24)  # the tiny model's 72 tensors are then "many"
    tuned = fine_tune(tiny_dir("mixtral"), tmp_path / "tuned")
    reads = count_preads(monkeypatch)
    base = source_of(tiny_dir("mixtral")).fingerprint()
    assert len(reads) == 24
    assert source_of(tuned).fingerprint() != base


# --- unreadable files: one line naming the file and the fix ------------------------------------------
@pytest.mark.parametrize("keep", [100, 0.5])  # inside the header, inside the tensor data
def test_truncated_safetensors_is_named(tiny_dir, tmp_path, keep):
    shutil.copytree(tiny_dir("mixtral"), tmp_path / "m")
    f = next((tmp_path / "m").glob("*.safetensors"))
    size = f.stat().st_size
    with open(f, "r+b") as fh:
        fh.truncate(keep if isinstance(keep, int) else int(size * keep))
    with pytest.raises(OffloadError, match=rf"{f.name}.* re-download"):
        OffloadedModel.from_pretrained(tmp_path / "m")


def test_unreadable_safetensors_is_named(tiny_dir, tmp_path):
    shutil.copytree(tiny_dir("mixtral"), tmp_path / "m")
    (tmp_path / "m" / "extra.safetensors").mkdir()  # cannot be opened as a file
    with pytest.raises(OffloadError, match=r"cannot read .*extra.safetensors"):
        OffloadedModel.from_pretrained(tmp_path / "m")


@pytest.mark.parametrize("content", ["", '{"version": 3, "fing', "[1, 2]"])
def test_truncated_or_empty_index_is_named(tiny_dir, tmp_path, content):
    path = tiny_dir("mixtral")
    OffloadedModel.from_pretrained(path, store="disk", store_dir=tmp_path / "s").close()
    (tmp_path / "s" / INDEX).write_text(content)
    with pytest.raises(OffloadError, match=r"index.json.*delete .* rebuild"):
        OffloadedModel.from_pretrained(path, store="disk", store_dir=tmp_path / "s")
    with pytest.raises(OffloadError, match=r"index.json.*delete .* rebuild"):
        DiskStore(tmp_path / "s")


def test_garbled_journal_restarts_the_conversion(tiny_dir, tmp_path):
    """The journal only says what can be resumed: one we cannot parse means starting over, not a traceback."""
    src = source_of(tiny_dir("mixtral"))
    convert(src, tmp_path / "clean", {"format": "dense"}, progress=False)
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / JOURNAL).write_text('{"records": [[0, 0')
    (tmp_path / "s" / PARTIAL).write_bytes(b"\x01" * 1000)
    convert(src, tmp_path / "s", {"format": "dense"}, progress=False)
    assert digest(tmp_path / "s") == digest(tmp_path / "clean")


def test_read_only_store_dir_is_one_line(tiny_dir, tmp_path, monkeypatch):
    import builtins
    import errno

    real_open = builtins.open

    def read_only(path, mode="r", *a, **k):
        if str(path).startswith(str(tmp_path / "s")) and any(c in mode for c in "wa+"):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr(builtins, "open", read_only)
    with pytest.raises(OffloadError, match=r"cannot write the expert store in .*s \(Read-only file system\); "
                                           r"choose a writable store_dir"):
        OffloadedModel.from_pretrained(tiny_dir("mixtral"), store="disk", store_dir=tmp_path / "s")
