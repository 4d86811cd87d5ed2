"""dense_bits: every non-expert linear (attention, shared experts, dense MLPs, lm_head) quantized while it loads.

Routers keep their dtype (their top-k choices are discrete: a rounding flips experts) and embeddings stay
(a token reads one row of them). Formats are the expert ones from offload/quant.py: int8 per output
channel, or int4 with the largest group of 128/64/32 that divides in_features (int8 where torch's CPU int4
kernel cannot hold the shape).

Loading: while transformers builds the model (on the meta device), every eligible `nn.Linear` is swapped
for a `QuantizedLinear` placeholder as it is registered. Transformers then loads the checkpoint one tensor
at a time (its async loader is switched off for the call, as it does itself for on-the-fly quantization)
and hands each weight to the placeholder's `weight` attribute, which quantizes it on the spot, so the
full-precision weight is freed before the next one is read. Renames, fused checkpoints and tied lm_heads
stay transformers' business.

Cache: with store="disk" the storage forms go to `store_dir/dense-int4.safetensors` (or -int8), tied to
the checkpoint fingerprint and settings by `dense-int4.json`, which is written last and atomically: a
second load reads the quantized forms back and quantizes nothing.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from offload.errors import OffloadError
from offload.formats.quant import QFormat, compute_layout, parse_format, qlinear, quantize, to_compute
from offload.store.safetensors_file import DTYPES, SafetensorsFile

BLOCK_ELEMENTS = 1 << 22  # weights quantized at a time: bounds the fp32 temporaries of a vocab-sized lm_head
CACHE_VERSION = 1
_ROUTERS = ("gate", "router")  # names transformers gives MoE routers (Mixtral/Qwen `mlp.gate`, Phi/Llama-4 `router`)
_ST_NAMES = {dtype: name for name, dtype in DTYPES.items()}
Parts = dict[str, torch.Tensor]


def dense_format(bits: int, shape) -> QFormat:
    """The format of one [out, in] matrix at `bits`: int4 with the largest group dividing in_features, else int8."""
    N, K = (int(d) for d in shape)
    if bits == 4 and N % 16 == 0:
        for g in (128, 64, 32):
            if K % g == 0:
                return QFormat("int4", g)
    return QFormat("int8")


def row_blocks(shape) -> list[slice]:
    """Row ranges quantized one at a time: whole int4 packing blocks (multiples of 64 rows), so quantizing,
    packing and the kernel layout of a block are those rows of the whole matrix (rows are independent)."""
    N, K = (int(d) for d in shape)
    rows = max(64, BLOCK_ELEMENTS // K // 64 * 64)
    return [slice(r, min(r + rows, N)) for r in range(0, N, rows)]


def quantize_weight(w: torch.Tensor, bits: int) -> Iterator[tuple[slice, QFormat, Parts]]:
    """(rows, format, storage form of those rows) of one linear weight, block by block: the only place
    dense weights are quantized."""
    fmt = dense_format(bits, w.shape)
    for rows in row_blocks(w.shape):
        yield rows, fmt, quantize(w[rows], fmt)


def rows_first(name: str, t: torch.Tensor) -> torch.Tensor:
    """A storage tensor with out_features first (qsz is [K/G, N, 2]): blocks of rows then concatenate."""
    return t.transpose(0, 1) if name == "qsz" else t


def is_router(parent: nn.Module, name: str) -> bool:
    return _router_name(name) or "Router" in type(parent).__name__


def _router_name(name: str) -> bool:
    return name in _ROUTERS or name.endswith("_gate")


def eligible(parent: nn.Module, name: str, module: nn.Module) -> bool:
    """Plain nn.Linear children that are not routers (router subclasses such as Llama4Router never match)."""
    return type(module) is nn.Linear and not is_router(parent, name)


def resident_bytes(bits: int | None, shape, dtype: torch.dtype) -> int:
    """Bytes one [out, in] weight takes in memory at `bits` (None: the model dtype)."""
    if bits is None:
        return math.prod(shape) * dtype.itemsize
    return sum(math.prod(s) * dt.itemsize for _n, s, dt in compute_layout(dense_format(bits, shape), shape))


class QuantizedLinear(nn.Module):
    """y = x @ W.T (+ bias) through torch's CPU int8/int4 kernels; W is quantized when it is assigned.

    Assigning `weight` (transformers' loader, `tie_weights`, or `from_linear`) quantizes it and keeps only
    the kernel form, in `resident`: a plain dict, not buffers, because transformers' loader replaces every
    non-persistent buffer with an empty one after loading. The bias stays a parameter in the model dtype.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, bits: int, dtype: torch.dtype,
                 device: torch.device | str = "meta") -> None:
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.fmt = dense_format(bits, (out_features, in_features))
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device="meta"),
                                   requires_grad=False)  # what transformers loads into; replaced on assignment
        self.bias = (nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
                     if bias else None)
        self.resident: Parts = {}  # the kernel form (quant.compute_layout)
        self.on_quantized: Callable[[QuantizedLinear, Parts], None] | None = None  # the loader's cache writer
        self.on_consumed: Callable[[torch.Tensor], None] | None = None  # the loader, done with a weight
        self.skip_weight = False   # the loader fills this module from its cache: drop what transformers hands over
        self._is_hf_initialized = True  # nothing for transformers' _init_weights to touch

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int) -> QuantizedLinear:
        """A quantized copy of a loaded nn.Linear (the reference path: a stock model, quantized afterwards)."""
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, bits, linear.weight.dtype,
                linear.weight.device)
        if linear.bias is not None:
            q.bias.data.copy_(linear.bias.data)
        q._receive(linear.weight)
        return q

    @property
    def shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    @property
    def loaded(self) -> bool:
        return bool(self.resident)

    def __setattr__(self, name: str, value) -> None:
        if name == "weight" and isinstance(value, torch.Tensor) and value.device.type != "meta":
            if getattr(value, "_is_hf_initialized", False):  # loaded or tied; not an empty stand-in for a missing key
                self._receive(value)
        else:
            super().__setattr__(name, value)

    def _receive(self, w: torch.Tensor) -> None:
        if tuple(w.shape) != self.shape:
            raise OffloadError(f"a {tuple(w.shape)} weight was assigned to a {self.shape} linear; the checkpoint "
                               f"does not match its config.json")
        if self.skip_weight:
            self._parameters.pop("weight", None)
            return
        if w.device.type != "cpu":
            raise OffloadError("dense_bits runs on torch's CPU int8/int4 kernels; use device='cpu' or dense_bits=None")
        self._parameters.pop("weight", None)
        self.resident = {}
        for rows, fmt, parts in quantize_weight(w.detach(), self.bits):
            self.set_rows(rows, parts, fmt)
            if self.on_quantized is not None:
                self.on_quantized(self, parts)
        if self.on_consumed is not None:
            self.on_consumed(w)

    def set_rows(self, rows: slice, parts: Parts, fmt: QFormat) -> None:
        """Install the storage form of `rows` (freshly quantized, or read from the cache) into the kernel form."""
        if not self.resident:
            self.fmt = fmt
            self.resident = {name: torch.empty(s, dtype=dt) for name, s, dt in compute_layout(fmt, self.shape)}
        out = {name: rows_first(name, t)[rows] for name, t in self.resident.items()}
        to_compute(parts, fmt, (rows.stop - rows.start, self.in_features), "cpu",
                   out={name: rows_first(name, t) for name, t in out.items()})
        self._parameters.pop("weight", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.loaded:
            raise RuntimeError(f"QuantizedLinear {self.shape} used before its weight was loaded")
        y = qlinear(x, self.resident, self.fmt, self.shape)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               f"format={self.fmt}"


def quantize_linears(model: nn.Module, bits: int) -> nn.Module:
    """Replace every eligible nn.Linear of a loaded model by its QuantizedLinear, in place; returns `model`."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if eligible(parent, name, child):
                setattr(parent, name, QuantizedLinear.from_linear(child, bits))
    return model


# --- loading ---------------------------------------------------------------------------------------
class DenseLoader:
    """Quantizes the non-expert linears of one `from_pretrained` call, through the cache in `cache_dir` if any."""

    def __init__(self, bits: int, dtype: torch.dtype, cache_dir: Path | None = None,
                 fingerprint: str | None = None, checkpoint: list[Path] | None = None,
                 checkpoint_keys: set[str] | None = None) -> None:
        """`checkpoint`: its safetensors files, whose mapped pages are dropped as each weight is quantized;
        `checkpoint_keys`: its tensor names, so weights that the cache holds are never read."""
        self.bits, self.dtype = bits, dtype
        self.checkpoint = {str(Path(f).resolve()) for f in checkpoint or []}
        self.checkpoint_keys = checkpoint_keys or set()
        self.embeddings: list[nn.Embedding] = []  # a tied lm_head is handed their weight: it stays mapped
        self._mapped: list[tuple[int, int]] | None = None
        self.cache = DenseCache(cache_dir, bits, dtype, fingerprint) if cache_dir is not None else None
        self.placeholders: list[QuantizedLinear] = []
        self._hit = self.cache is not None and self.cache.valid()
        self._writer: _Writer | None = None

    @contextlib.contextmanager
    def loading(self) -> Iterator[None]:
        """Around transformers' from_pretrained: swap eligible linears for placeholders as they are registered,
        and load synchronously (its thread pool would read every full-precision tensor ahead of the quantizer)."""
        if self.cache is not None and not self._hit:
            self._writer = _Writer(self.cache.data_path)

        def swap(parent: nn.Module, name: str, module: nn.Module | None):
            if module is None or not type(parent).__module__.startswith("transformers.models."):
                return None  # only the model transformers is building
            if isinstance(module, nn.Embedding):
                self.embeddings.append(module)
            if not eligible(parent, name, module):
                return None
            q = QuantizedLinear(module.in_features, module.out_features, module.bias is not None, self.bits,
                                module.weight.dtype, module.weight.device)
            q.skip_weight = self._hit
            q.on_quantized = self._writer.add if self._writer is not None else None
            q.on_consumed = self._release
            if self._hit:
                q._register_state_dict_hook(self._hide_cached)
            self.placeholders.append(q)
            return q

        handle = torch.nn.modules.module.register_module_module_registration_hook(swap)
        previous = os.environ.get("HF_DEACTIVATE_ASYNC_LOAD")
        os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = "1"
        try:
            yield
        except BaseException:
            if self._writer is not None:
                self._writer.abort()
            raise
        finally:
            handle.remove()
            if previous is None:
                os.environ.pop("HF_DEACTIVATE_ASYNC_LOAD", None)
            else:
                os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = previous

    def _hide_cached(self, module: nn.Module, state_dict: dict, prefix: str, _meta) -> None:
        """Leave a weight the cache holds out of the state dict transformers loads against: it is then skipped
        unread. One the checkpoint lacks (a tied lm_head) stays, for transformers to tie."""
        if prefix + "weight" in self.checkpoint_keys:
            state_dict.pop(prefix + "weight", None)

    def _release(self, w: torch.Tensor) -> None:
        """Drop the pages of a quantized weight that is a view of the mmapped checkpoint (transformers loads
        zero-copy): they would stay in this process's RSS, next to their quantized form, for as long as
        anything else (the embedding) keeps the file mapped. Clean file pages: the file still has them."""
        if any(w is e.weight for e in self.embeddings) or not self.checkpoint:
            return
        if self._mapped is None:
            self._mapped = _mapped_ranges(self.checkpoint)
        begin = w.untyped_storage().data_ptr() + w.storage_offset() * w.element_size()
        end = begin + w.numel() * w.element_size()
        if any(lo <= begin and end <= hi for lo, hi in self._mapped):
            _dont_need(begin, end)

    def finish(self, model: nn.Module) -> None:
        """After from_pretrained: fill the placeholders from the cache, or check they all loaded and write it."""
        names = {id(m): n for n, m in model.named_modules()}
        live = [q for q in self.placeholders if id(q) in names]  # transformers may build and drop modules
        for q in live:
            q.on_quantized = q.on_consumed = None
            q._state_dict_hooks.clear()
        if self._hit:
            self.cache.fill({names[id(q)]: q for q in live})
        missing = [names[id(q)] for q in live if not q.loaded]
        if missing:
            if self._writer is not None:
                self._writer.abort()
            raise OffloadError(f"the checkpoint has no weight for {', '.join(missing[:3])}; it does not match its "
                               f"config.json (or load it with dense_bits=None)")
        if self._writer is not None:
            self.cache.publish(self._writer, names)
            self._writer = None


def _mapped_ranges(files: set[str]) -> list[tuple[int, int]]:
    """Address ranges where this process maps any of `files` (Linux /proc; nothing elsewhere)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] in files:
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            ranges.append((lo, hi))
    return ranges


def _dont_need(begin: int, end: int) -> None:
    """madvise(MADV_DONTNEED) on the whole pages inside [begin, end)."""
    import ctypes
    import mmap

    page = mmap.PAGESIZE
    lo, hi = -(-begin // page) * page, end // page * page
    if hi > lo:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), mmap.MADV_DONTNEED)


class DenseCache:
    """`dense-int{bits}.safetensors` + `.json` (fingerprint, settings, formats, size) in a store dir. Tensors are
    `{module}.{block}.{name}`: each row block's storage form, out_features first (see `rows_first`)."""

    def __init__(self, directory: Path, bits: int, dtype: torch.dtype, fingerprint: str | None) -> None:
        self.dir = Path(directory)
        stem = f"dense-int{bits}"
        self.path, self.meta_path = self.dir / f"{stem}.safetensors", self.dir / f"{stem}.json"
        self.data_path = self.dir / f"{stem}.data.partial"
        self.head = {"version": CACHE_VERSION, "fingerprint": fingerprint,
                     "settings": {"dense_bits": bits, "dtype": str(dtype).removeprefix("torch.")}}

    def _meta(self) -> dict | None:
        try:
            meta = json.loads(self.meta_path.read_text())
        except (OSError, ValueError):
            return None
        return meta if {k: meta.get(k) for k in self.head} == self.head else None

    def valid(self) -> bool:
        meta = self._meta()
        return meta is not None and self.path.is_file() and self.path.stat().st_size == meta.get("size")

    def fill(self, modules: dict[str, QuantizedLinear]) -> None:
        meta = self._meta()
        if meta is None or set(meta["modules"]) != set(modules):
            raise OffloadError(f"{self.path} does not match this model's linears; delete {self.path} and "
                               f"{self.meta_path} to rebuild them")
        f = SafetensorsFile(self.path)
        tensors: dict[str, list[str]] = {}
        for key in f.keys():
            block, _, tname = key.rpartition(".")
            tensors.setdefault(block, []).append(tname)
        for name, q in modules.items():
            fmt = parse_format(meta["modules"][name])
            for b, rows in enumerate(row_blocks(q.shape)):
                block = f"{name}.{b}"
                q.set_rows(rows, {t: rows_first(t, f.read(f"{block}.{t}")) for t in tensors[block]}, fmt)

    def publish(self, writer: _Writer, names: dict[int, str]) -> None:
        """Write the safetensors file from the writer's data, then the json that makes it valid (both atomic)."""
        header, formats, blocks = {}, {}, {}
        for owner, fmt, tensors in writer.entries:  # one entry per row block, in order
            name = names[owner]
            formats[name] = str(fmt)
            b = blocks[name] = blocks.get(name, -1) + 1
            for tname, dtype, shape, begin, end in tensors:
                header[f"{name}.{b}.{tname}"] = {"dtype": _ST_NAMES[dtype], "shape": list(shape),
                                                 "data_offsets": [begin, end]}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors pads its header with spaces to keep tensors aligned
        tmp = self.path.with_name(self.path.name + ".tmp")
        writer.close()
        with open(tmp, "wb") as out, open(self.data_path, "rb") as data:
            out.write(struct.pack("<Q", len(raw)) + raw)
            shutil.copyfileobj(data, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.path)
        self.data_path.unlink()
        from offload.store.convert import atomic_write_text

        atomic_write_text(self.meta_path, json.dumps({**self.head, "size": self.path.stat().st_size,
                                                      "modules": formats}, indent=1))


class _Writer:
    """Appends each row block's storage form (rows first) to a data file as it is quantized; the module
    names come once the model is built."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.file, self.end = path, open(path, "wb"), 0
        self.entries: list[tuple[int, QFormat, list]] = []  # (id of the module, format, tensor extents)

    def add(self, module: QuantizedLinear, parts: Parts) -> None:
        tensors = []
        for name, t in parts.items():
            t = rows_first(name, t).contiguous()
            data = t.view(-1).view(torch.uint8).numpy()
            self.file.write(memoryview(data))
            tensors.append((name, t.dtype, tuple(t.shape), self.end, self.end + data.nbytes))
            self.end += data.nbytes
        self.entries.append((id(module), module.fmt, tensors))

    def close(self) -> None:
        self.file.close()

    def abort(self) -> None:
        self.file.close()
        self.path.unlink(missing_ok=True)


# --- accounting ------------------------------------------------------------------------------------
def non_expert_bytes(source, hf_config, bits: int | None) -> int:
    """Non-expert bytes of a checkpoint (from its headers) with its linears at `bits`: every 2-D `.weight`
    that is not an embedding or a router counts as a linear, and a tied lm_head adds its quantized copy."""
    total = source.non_expert_bytes()
    if bits is None:
        return total
    dtype = source.dtype
    embedding = None
    for name, shape in source.non_expert_shapes().items():
        if not name.endswith(".weight") or len(shape) != 2:
            continue
        if "embed" in name or name.endswith("wte.weight"):
            embedding = shape
            continue
        if any(_router_name(part) for part in name.split(".")[:-1]):
            continue
        total += resident_bytes(bits, shape, dtype) - resident_bytes(None, shape, dtype)
    text = hf_config.get_text_config()
    if getattr(text, "tie_word_embeddings", False) and embedding is not None:
        total += resident_bytes(bits, embedding, dtype)
    return total


def cache_dense(model_dir, store_dir: Path, bits, dtype: str, dense_bits: int) -> str:
    """`offload-convert --dense-bits`: write the dense cache next to the expert store, by loading the model
    once with the settings `from_pretrained(store="disk", store_dir=..., dense_bits=...)` asks for."""
    from offload.model import OffloadedModel
    from offload.store.source import open_checkpoint
    from offload.config import parse_dtype

    _hf, _arch, _source, top_k = open_checkpoint(model_dir, parse_dtype(dtype))
    with OffloadedModel.from_pretrained(model_dir, store="disk", store_dir=str(store_dir), bits=bits, dtype=dtype,
                                        dense_bits=dense_bits, cache_experts=top_k) as m:
        cache = DenseCache(Path(store_dir), dense_bits, m.config.dtype, None)
        return (f"{cache.path}: non-expert linears at int{dense_bits}, "
                f"{m.plan.non_expert_bytes / 2**20:.1f} MiB of non-expert weights in memory")
