"""RecordCodec: quantized expert records - what the store holds, what a slot holds, how to multiply.

Each record has a *kind*, named by its two matrix formats ("int4-g128/int4-g64"): the storage layout
(compact codes, written once by the converter), the compute layout (the resident form torch's kernels
take, built by `to_compute` in the prefetch path, never per token) and a `linear` that runs them.
Biases stay dense in the model dtype. `bits` may differ per layer: {"default": 4, "layers[0:2]": 8}.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cached_property

import torch

from offload.errors import OffloadError
from offload.formats.budget import BitsBudget
from offload.store.layout import ExpertLayout, TensorSpec
from offload.formats.quant import (GROUP_SIZES, QFormat, compute_layout, parse_format, qlinear, quantize, resolve_format,
                           storage_layout, to_compute)

MATRICES = ("gate_up", "down")
_BITS = {8: "int8", 4: "int4", 3: "int3", 2: "int2", 1: "ternary"}


def format_of(bits) -> QFormat | None:
    """None/16 -> dense (the model dtype); 8/4/3/2 -> int; 'ternary', 'ternary-z90', 'int4-g64', ..."""
    if bits is None or bits == 16 or bits in ("bf16", "16", "dense"):
        return None
    budget = BitsBudget.of(bits)
    if budget is not None:  # each record's shares are the converter's (offload/store/allocation.py)
        return budget.fmt
    if isinstance(bits, int) and bits in _BITS:
        return parse_format(_BITS[bits])
    if isinstance(bits, str):
        return parse_format(_BITS[int(bits)] if bits.isdigit() and int(bits) in _BITS else bits)
    raise OffloadError(f"bits must be 16, 8, 4, 3, 2, 'ternary' or a format like 'int4-g64' or 'ternary-z90', "
                       f"got bits={bits!r}")


def format_rule(bits) -> Callable[[int, int], QFormat | None]:
    """bits option -> (layer, expert) -> format. Dict keys: 'default', 'layers[i]', 'layers[a:b]'."""
    if callable(bits):
        return lambda layer, expert: _part_of(bits(layer, expert))
    if not isinstance(bits, dict):
        fmt = format_of(bits)
        return lambda layer, expert: fmt
    rules = []
    for key, value in bits.items():
        if key == "default":
            continue
        m = re.fullmatch(r"layers\[(\d*)(:?)(\d*)\]", key.replace(" ", ""))
        if not m:
            raise OffloadError(f"bits key {key!r} not understood; use 'default', 'layers[3]' or 'layers[0:4]'")
        lo = int(m.group(1) or 0)
        hi = (int(m.group(3)) if m.group(3) else 10**9) if m.group(2) else lo + 1
        rules.append((lo, hi, _part_of(value)))
    default = _part_of(bits.get("default"))
    return lambda layer, expert: next((f for lo, hi, f in rules if lo <= layer < hi), default)


def _part_of(bits) -> QFormat | None:
    """A per-layer or per-expert format: anything format_of takes but a bits budget, which is the whole model's."""
    if BitsBudget.of(bits) is not None:
        raise OffloadError(f"{bits!r} is a bits budget for the whole model; give it as bits={bits!r}, not per layer "
                           f"or per expert (or use a fixed share there, such as 'ternary-z80')")
    return format_of(bits)


@dataclass(frozen=True)
class RecordKind:
    """One combination of matrix formats: storage and compute layouts plus the matching linear."""

    formats: tuple[QFormat, QFormat]       # gate_up, down
    shapes: tuple[tuple[int, int], tuple[int, int]]  # [N, K] of each matrix (out, in)
    biases: tuple[TensorSpec, ...]
    device_type: str

    @property
    def name(self) -> str:
        return "/".join(str(f) for f in self.formats)

    def _layout(self, per_matrix) -> ExpertLayout:
        specs = [TensorSpec(f"{m}.{n}", tuple(s), dt) for m, fmt, shape in zip(MATRICES, self.formats, self.shapes)
                 for n, s, dt in per_matrix(fmt, shape)]
        return ExpertLayout(tuple(specs) + self.biases)

    @cached_property
    def storage(self) -> ExpertLayout:
        return self._layout(storage_layout)

    @cached_property
    def compute(self) -> ExpertLayout:
        return self._layout(lambda f, s: compute_layout(f, s, self.device_type))

    def split(self, flat: dict[str, torch.Tensor]) -> dict:
        """{'gate_up.qweight': t, ...} -> {'gate_up': {'qweight': t}, ..., 'gate_up_bias': t}"""
        out: dict = {}
        for name, t in flat.items():
            if "." in name:
                m, part = name.split(".", 1)
                out.setdefault(m, {})[part] = t
            else:
                out[name] = t
        return out

    def linear(self, x: torch.Tensor, w: dict, name: str) -> torch.Tensor:
        i = MATRICES.index(name)
        return qlinear(x, w[name], self.formats[i], self.shapes[i])


def matrix_shapes(dense: ExpertLayout, transposed: bool) -> tuple[tuple[int, int], ...]:
    """[N, K] (out, in features) of each of MATRICES, whichever way the checkpoint stores them."""
    specs = {s.name: s for s in dense.specs}
    return tuple(tuple(specs[m].shape[::-1] if transposed else specs[m].shape) for m in MATRICES)


class RecordCodec:
    def __init__(self, dense: ExpertLayout, rule: Callable[[int, int], QFormat | None], transposed: bool,
                 device: torch.device) -> None:
        self.dense, self.rule, self.transposed, self.device = dense, rule, transposed, torch.device(device)
        self.shapes = matrix_shapes(dense, transposed)
        self.biases = tuple(s for s in dense.specs if s.name not in MATRICES)
        self._kinds: dict[str, RecordKind] = {}
        self._views: dict[tuple[int, str], dict] = {}

    def kind(self, formats: tuple[QFormat, QFormat]) -> RecordKind:
        k = RecordKind(formats, self.shapes, self.biases, self.device.type)
        return self._kinds.setdefault(k.name, k)

    def kind_named(self, name: str) -> RecordKind:
        if name not in self._kinds:
            self.kind(tuple(parse_format(p) for p in name.split("/")))
        return self._kinds[name]

    def entropy_coded(self, kind_name: str) -> bool:
        """Whether the store should try lzma on records of this kind (any matrix in a sparse format)."""
        return any(f.entropy_coded for f in self.kind_named(kind_name).formats)

    def candidates(self) -> list[RecordKind]:
        """Every kind the rule can produce (adaptive: every group size), to size records and slots."""
        fmts = set()
        for layer in range(0, 512):  # rules are per layer; 512 covers every model we know
            f = self.rule(layer, 0)
            fmts.add(f)
        if None in fmts:
            raise OffloadError("mixing dense (16-bit) and quantized experts is not supported; give every layer a "
                               "bit width of 8 or less, or none at all")
        kinds = []
        for f in fmts:
            options = [replace(f, group_size=g) for g in GROUP_SIZES] if f.adaptive else [f]
            usable = [o for o in options if self._fits(o)]
            if not usable:
                ks = sorted({s[1] for s in self.shapes})
                fits = [f"{f.kind}-g{g}" for g in GROUP_SIZES if all(k % g == 0 for k in ks)]
                fix = f"use {' or '.join(fits)}" if fits else "no group size divides them: use int8"
                raise OffloadError(f"{f} needs the experts' input sizes {ks} divisible by its group size; {fix}")
            kinds += [self.kind((a, b)) for a in usable for b in usable]
        return kinds

    def _fits(self, f: QFormat) -> bool:
        return all(f.group_size == 0 or s[1] % f.group_size == 0 for s in self.shapes)

    @cached_property
    def record_bytes(self) -> int:
        return max(k.storage.nbytes for k in self.candidates())

    @cached_property
    def slot_bytes(self) -> int:
        return max(k.compute.nbytes for k in self.candidates())

    # --- converter side --------------------------------------------------------------------------
    def meta(self, keys: list) -> dict:
        """What index.json records about how this codec encoded the records of `keys` (weights alone: nothing)."""
        return {}

    def encode(self, key: tuple[int, int], tensors: dict[str, torch.Tensor]):
        """Dense record tensors -> (kind name, storage layout, storage tensors): the converter's encoder."""
        mats = {m: tensors[m].T if self.transposed else tensors[m] for m in MATRICES}  # quantizers convert by chunks
        fmts = self.formats_of(key, mats)
        kind = self.kind(fmts)
        out = {}
        for m, f in zip(MATRICES, fmts):
            for part, t in self.quantize_matrix(key, m, mats[m], f).items():
                out[f"{m}.{part}"] = t
        for b in self.biases:
            out[b.name] = tensors[b.name]
        return kind.name, kind.storage, out

    def formats_of(self, key: tuple[int, int], mats: dict[str, torch.Tensor]) -> tuple[QFormat, QFormat]:
        """The (gate_up, down) formats of expert `key`: the rule's, group sizes resolved per matrix."""
        fmt = self.rule(*key)
        return tuple(resolve_format(fmt, mats[m]) for m in MATRICES)

    def quantize_matrix(self, key: tuple[int, int], matrix: str, w: torch.Tensor, fmt: QFormat) -> dict:
        """One matrix of expert `key` in its storage form: from the weights alone here (calibrated codecs
        override it)."""
        return quantize(w, fmt)

    # --- engine side -----------------------------------------------------------------------------
    def transform(self, kind_name: str, record: torch.Tensor, slot: torch.Tensor) -> None:
        """Storage record -> resident form in `slot` (runs in the prefetch path)."""
        kind = self.kind_named(kind_name)
        src = kind.split(kind.storage.views(record))
        dst = kind.split(kind.compute.views(slot))
        for i, m in enumerate(MATRICES):
            to_compute(src[m], kind.formats[i], kind.shapes[i], self.device, out=dst[m])
        for b in self.biases:
            dst[b.name].copy_(src[b.name], non_blocking=True)

    def views(self, slots, slot: int, kind_name: str) -> dict:
        v = self._views.get((slot, kind_name))
        if v is None:
            kind = self.kind_named(kind_name)
            v = self._views[(slot, kind_name)] = kind.split(kind.compute.views(slots.raw(slot)))
        return v
