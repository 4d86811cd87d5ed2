"""A bits budget's choice of zeros per expert matrix (offload/formats/budget.py), measured from the checkpoint
and the calibration statistics, cached in the store (`budget.json`) and applied by `BudgetCodec`."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from offload.formats.budget import ZEROS, BitsBudget, Costs, Key, allocate
from offload.formats.quant import QFormat, dequantize
from offload.formats.record import MATRICES
from offload.progress import progress_bar
from offload.store.calibrate import CalibratedCodec
from offload.store.codec import Lzma
from offload.store.disk import ALIGN, ALIGN_MIN, checksum
from offload.store.source import CheckpointSource

CACHE = "budget.json"
HEADER_BYTES = 1024  # index.json's version, fingerprint and settings, with room to spare
Choice = dict[Key, tuple[int, int]]  # zero percent of (gate_up, down)


class BudgetCodec(CalibratedCodec):
    """A CalibratedCodec whose every record takes the zero shares its budget chose for it."""

    def __init__(self, codec: CalibratedCodec, budget: BitsBudget, choice: Choice) -> None:
        super().__init__(codec, codec.stats, codec.min_tokens, codec.support)
        self.budget, self.choice = budget, choice

    def formats_of(self, key, mats):
        return tuple(QFormat("ternary", zeros=z) for z in self.choice[tuple(key)])

    def meta(self, keys: list) -> dict:
        shares = [z for k in keys for z in self.choice[tuple(k)]]
        return {**super().meta(keys), "budget": {"bits_per_param": self.budget.bits,
                                                 "mean_zeros": round(sum(shares) / len(shares), 2)}}


def measure(codec: CalibratedCodec, source: CheckpointSource, progress: bool = True) -> Costs:
    """Code every expert matrix at every share in ZEROS with `codec` and score it: the output error summed over
    the tokens routed to it (at least codec.min_tokens; the layer's mean H where it saw none), lzma bytes."""
    stats = codec.stats
    layer_h: dict = {}
    for (layer, _), s in stats.items():
        for m in MATRICES:
            layer_h.setdefault((layer, m), []).append(s[m])
    layer_h = {k: torch.stack(v).mean(0) for k, v in layer_h.items()}
    error, nbytes = {}, {}
    coder = Lzma()
    keys = source.keys()
    with progress_bar(f"measuring {len(ZEROS)} zero shares", len(keys), progress, unit="experts") as bar:
        for key in keys:
            tensors = source.read(key)
            s = stats.get(tuple(key))
            weight = max(s["tokens"] if s else 0, codec.min_tokens)
            for i, m in enumerate(MATRICES):
                w = (tensors[m].T if codec.transposed else tensors[m]).float()
                H = s[m] if s else layer_h.get((key[0], m), torch.eye(w.shape[1]))
                error[key, m], nbytes[key, m] = [], []
                for z in ZEROS:
                    fmt = QFormat("ternary", zeros=z)
                    parts = codec.quantize_matrix(key, m, w, fmt)
                    E = w - dequantize(parts, fmt, codec.shapes[i])
                    error[key, m].append(weight * float(torch.einsum("nk,kl,nl->", E, H, E)))
                    raw = b"".join(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() for t in parts.values())
                    nbytes[key, m].append(len(coder.encode(raw)))
            bar(1)
    return Costs(error, nbytes)


def index_bytes(codec: CalibratedCodec, keys: list, kinds: int) -> int:
    """An upper bound on index.json for the records of `keys` in `kinds` distinct kinds: one journal entry each,
    one layout per kind, the header and the codec's meta (with a budget's of its own)."""
    fmt = QFormat("ternary", zeros=ZEROS[-1])
    kind = codec.kind((fmt, fmt))
    entry = json.dumps([99999, 99999, kind.name, checksum(b""), 2**50, 2**40, "lzma"])
    layout = json.dumps({kind.name: kind.storage.to_json()})
    return len(keys) * (len(entry) + 2) + kinds * (len(layout) + 2) + len(json.dumps(codec.meta(keys))) + HEADER_BYTES


def target_bytes(budget: BitsBudget, source: CheckpointSource, codec: CalibratedCodec, kinds: int) -> int:
    """The records' bytes the budget allows, padding not yet taken off: its bits over every expert parameter,
    less the index."""
    params = len(source.keys()) * sum(math.prod(s.shape) for s in source.layout.specs)
    return int(budget.bits * params / 8) - index_bytes(codec, source.keys(), kinds)


def padding(costs: Costs, picks: dict[Key, tuple[int, ...]]) -> int:
    """The worst alignment padding of records coded at `picks` (candidate indices per matrix): ALIGN before each
    record that may reach ALIGN_MIN bytes (its measured size within 10%: the record is coded whole, not per
    matrix)."""
    sizes = (sum(costs.nbytes[k, m][j] for m, j in zip(MATRICES, js)) for k, js in picks.items())
    return ALIGN * sum(size >= 0.9 * ALIGN_MIN for size in sizes)


def choose(costs: Costs, budget: BitsBudget, source: CheckpointSource, codec: CalibratedCodec) -> Choice:
    """The allocation within the budget, the index sized for as many record kinds as a choice has and the
    padding for as many aligned records. The first try assumes the most there can be (one kind per record,
    every record aligned that can be); each next one assumes what the previous choice used. Of the choices
    that fit what they assumed, the one with the most bytes to spend wins."""
    keys = [tuple(k) for k in source.keys()]
    longest = {k: tuple(max(range(len(ZEROS)), key=costs.nbytes[k, m].__getitem__) for m in MATRICES) for k in keys}
    assumed, best, tried = (len(keys), padding(costs, longest)), None, set()
    while assumed not in tried and len(tried) < 8:
        tried.add(assumed)
        target = target_bytes(budget, source, codec, assumed[0]) - assumed[1]
        picked = allocate(costs, target)
        picks = {k: tuple(picked[k, m] for m in MATRICES) for k in keys}
        found = {k: tuple(ZEROS[j] for j in js) for k, js in picks.items()}
        used = (len(set(found.values())), padding(costs, picks))
        if used[0] <= assumed[0] and used[1] <= assumed[1] and (best is None or target > best[0]):
            best = (target, found)
        assumed = used
    return best[1]


def budget_codec(codec: CalibratedCodec, budget: BitsBudget, source: CheckpointSource, store_dir: Path,
                 tag: dict, progress: bool = True) -> BudgetCodec:
    """`codec` at the budget's zeros per matrix: read from the store's cache, else measured and cached."""
    cache = Path(store_dir) / CACHE
    tag = {**tag, "fingerprint": source.fingerprint(), "budget": budget.bits, "zeros": list(ZEROS),
           "min_tokens": codec.min_tokens}
    if cache.exists():
        saved = json.loads(cache.read_text())
        if saved.get("tag") == tag:
            choice = {tuple(int(i) for i in k.split(".")): tuple(v) for k, v in saved["zeros"].items()}
            return BudgetCodec(codec, budget, choice)
    choice = choose(measure(codec, source, progress), budget, source, codec)
    Path(store_dir).mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(CACHE + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps({"tag": tag, "zeros": {f"{k[0]}.{k[1]}": list(v) for k, v in choice.items()}}))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, cache)
    return BudgetCodec(codec, budget, choice)
