"""Entropy coders of sparse ternary records: the Tunstall dictionary (dict16) round trips exactly, a dict16 store
reads back the lzma store's records bit for bit, and a corrupted dictionary is refused with the fix."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from offload import OffloadError
from offload.store import codec
from offload.store.codec import Dict16, ternary_segments
from offload.store.convert import build_store
from offload.store.disk import INDEX, DiskStore
from offload.store.tunstall import LANE, WORDS, TunstallDictionary


@pytest.fixture(scope="module")
def dictionaries():
    return {z: TunstallDictionary.build(((1 - z) / 2, z, (1 - z) / 2)) for z in (0.8, 0.95)}


def test_a_dictionary_is_a_complete_tree_of_2_16_minus_1_words(dictionaries):
    d = dictionaries[0.8]
    assert len(d.lengths) == WORDS and len(d.flags) == 1 + 3 * (WORDS - 1) // 2
    words = {bytes(d.table[w, :d.lengths[w]]) for w in range(WORDS)}
    assert len(words) == WORDS, "words are distinct"
    # Kraft equality: the words are the leaves of a complete ternary tree
    assert abs(sum(3.0 ** -float(n) for n in d.lengths) - 1) < 1e-9
    assert d.lengths[0] >= 1 and d.table[np.argmax(d.lengths), 0] == 1, "the longest word is the zero run"


@pytest.mark.parametrize("zero", [0.0, 0.3, 0.5, 0.8, 0.9, 0.99, 1.0])
@pytest.mark.parametrize("M", [1, LANE - 1, LANE, LANE + 1, 7 * LANE + 123])
def test_tunstall_round_trips_any_ternary_stream(dictionaries, zero, M):
    rng = np.random.default_rng(int(zero * 100) + M)
    digits = rng.choice(3, M, p=[(1 - zero) / 2, zero, (1 - zero) / 2]).astype(np.uint8)
    for d in dictionaries.values():  # whatever density the dictionary was built for
        coded = d.encode(digits)
        assert coded.dtype == np.uint16
        assert np.array_equal(d.decode(coded, M), digits)


def test_coded_size_is_near_the_entropy_at_the_built_density(dictionaries):
    rng = np.random.default_rng(0)
    digits = rng.choice(3, 40 * LANE, p=[0.1, 0.8, 0.1]).astype(np.uint8)
    bits = 16 * len(dictionaries[0.8].encode(digits)) / len(digits)
    entropy = -(0.8 * np.log2(0.8) + 0.2 * np.log2(0.1))
    assert entropy < bits < 1.03 * entropy
    assert bits < 16 * len(dictionaries[0.95].encode(digits)) / len(digits), "the matching dictionary codes shortest"


def test_the_stored_tree_rebuilds_the_same_dictionary(dictionaries):
    d = dictionaries[0.95]
    again = TunstallDictionary.from_bytes(d.to_bytes())
    assert np.array_equal(again.table, d.table) and np.array_equal(again.lengths, d.lengths)
    with pytest.raises(OffloadError, match="complete ternary tree"):
        TunstallDictionary(np.concatenate([d.flags[:-3], [True, False, False]]))


def test_decode_rejects_codewords_that_do_not_fit(dictionaries):
    d = dictionaries[0.8]
    coded = d.encode(np.ones(3 * LANE, dtype=np.uint8))
    with pytest.raises(ValueError):
        d.decode(coded[:-1], 3 * LANE)


def convert_both(model_dir, tmp_path, bits):
    for coder in ("lzma", "dict16"):
        build_store(model_dir, tmp_path / coder, bits=bits, progress=False, entropy_coder=coder)
    return DiskStore(tmp_path / "lzma"), DiskStore(tmp_path / "dict16")


@pytest.mark.parametrize("bits", ["ternary-z80", '{"default": "ternary-z90", "layers[0]": "ternary-z70"}'])
def test_dict16_store_reads_back_the_lzma_stores_records(tiny_dir, tmp_path, bits):
    model_dir = tiny_dir("mixtral")
    lz, d16 = convert_both(model_dir, tmp_path, json.loads(bits) if bits.startswith("{") else bits)
    a, b = (torch.empty(s.buffer_bytes, dtype=torch.uint8) for s in (lz, d16))
    for key in lz.keys():
        lz.read_into(key, a)
        d16.read_into(key, b)
        assert torch.equal(a[:lz.record_bytes], b[:d16.record_bytes]), key
        assert d16.codec_of(key) == "dict16", key
    index = json.loads((tmp_path / "dict16" / INDEX).read_text())
    assert set(index["dictionaries"]) == set(index["layouts"])
    assert "dictionaries" not in json.loads((tmp_path / "lzma" / INDEX).read_text())
    assert index["settings"]["entropy_coder"] == "dict16"


def test_dict16_keeps_the_bytes_outside_the_codes(tiny_dir, tmp_path):
    """Scales and layout padding pass through as they are; a record with a byte no base-3 code can be is left
    to the other codecs."""
    lz, _ = convert_both(tiny_dir("mixtral"), tmp_path, "ternary-z80")
    key = lz.keys()[0]
    fmt, layout = lz.format_of(key), lz.layout_of(key)
    coder = Dict16.for_kind(fmt, layout)
    rec = torch.empty(lz.buffer_bytes, dtype=torch.uint8)
    lz.read_into(key, rec)
    raw = rec[:layout.nbytes].numpy().copy()
    raw[~coder.rest] = 121  # digits 1 1 1 1 1: all zero codes
    raw[coder.rest] = np.arange(coder.rest.sum()) % 251
    assert coder.decode(coder.encode(memoryview(raw)), len(raw)) == raw.tobytes()
    start = ternary_segments(fmt, layout)[0][0]
    raw[start] = 250
    assert coder.encode(memoryview(raw)) is None


def corrupt_dictionary(store_dir):
    index = json.loads((store_dir / INDEX).read_text())
    entry = next(iter(index["dictionaries"].values()))
    tree = bytearray(__import__("base64").b64decode(entry["tree"]))
    tree[100] ^= 0x10
    entry["tree"] = __import__("base64").b64encode(bytes(tree)).decode()
    (store_dir / INDEX).write_text(json.dumps(index))


def test_a_corrupted_dictionary_is_refused_with_the_fix(tiny_dir, tmp_path):
    build_store(tiny_dir("mixtral"), tmp_path / "s", bits="ternary-z80", progress=False, entropy_coder="dict16")
    corrupt_dictionary(tmp_path / "s")
    with pytest.raises(OffloadError, match=r"dictionary of record kind ternary-z80/ternary-z80 in .*index.json is "
                                           r"corrupt \(checksum mismatch\); delete .* to rebuild the store"):
        DiskStore(tmp_path / "s")


def test_convert_cli_refuses_a_corrupted_dictionary_in_one_line(tiny_dir, tmp_path):
    from typer.testing import CliRunner

    from offload.cli.convert import convert_app

    args = [str(tiny_dir("mixtral")), "--out", str(tmp_path / "s"), "--bits", "ternary-z80",
            "--entropy-coder", "dict16"]
    assert CliRunner().invoke(convert_app, args).exit_code == 0
    corrupt_dictionary(tmp_path / "s")
    r = CliRunner().invoke(convert_app, args)
    assert r.exit_code == 2 and "is corrupt (checksum mismatch)" in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1
    bad = CliRunner().invoke(convert_app, args[:-1] + ["zstd"])
    assert bad.exit_code == 2 and "entropy_coder must be one of lzma, dict16" in bad.output


def test_a_model_on_a_dict16_store_generates_what_it_does_on_lzma(tiny_dir, tmp_path):
    from offload import OffloadedModel

    model_dir = tiny_dir("mixtral")
    ids = torch.tensor([[1, 5, 9, 13]])
    outs = {}
    for coder in ("lzma", "dict16"):
        with OffloadedModel.from_pretrained(model_dir, store="disk", store_dir=str(tmp_path / coder),
                                            bits="ternary-z80", entropy_coder=coder, cache_experts=2) as m:
            outs[coder] = m.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(outs["lzma"], outs["dict16"])
    with pytest.raises(OffloadError, match="entropy_coder dict16.*delete"):  # its settings name the coder
        OffloadedModel.from_pretrained(model_dir, store="disk", store_dir=str(tmp_path / "dict16"), bits="ternary-z80")


def test_lz4_is_tried_on_a_long_record_only_where_its_probes_compress():
    """Quantized codes (random bytes) skip lz4's trial and are stored raw, as the trial would have left them;
    a long record of mostly zeros is still found compressible and stored lz4-coded."""
    n = 4 * codec.PROBES * codec.PROBE
    noise = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)).numpy()
    sparse = np.where(np.arange(n) % 10 == 0, noise, 0).astype(np.uint8)
    assert not codec.lz4_may_pay(memoryview(noise)) and codec.lz4_may_pay(memoryview(sparse))
    assert codec.compress(memoryview(noise))[1] is None and codec.compress(memoryview(sparse))[1] == "lz4"
    assert codec.lz4_may_pay(memoryview(noise[:n - 1]))  # short records: the whole trial, as before
