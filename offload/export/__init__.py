"""offload-export: a converted store's quantized experts plus the checkpoint's other weights, written as a standard
quantized Hugging Face checkpoint that a multi-GPU server (vLLM, SGLang) loads: the hand-over when one machine is
outgrown (issue 18; docs/scale-out.md).

The experts are the store's own codes and scales, mapped into the target format's convention; nothing is
re-quantized from the original weights, so the served model is the one moe-offload ran. Where the target cannot
hold our convention exactly (GPTQ's integer zero points vs our float zero), the exporter moves each group's zero to
the nearest point the format holds and reports the change. Non-expert tensors are copied from the checkpoint in
their dtype. The output grows in DIR.partial (shards of at most `max_shard_bytes`, so memory stays at one shard) and
is renamed to DIR when complete: DIR exists only whole.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from offload.errors import OffloadError
from offload.formats.quant import QFormat, parse_format, unpack_codes
from offload.progress import progress_bar
from offload.store.arch import V5_FUSED
from offload.store.disk import INDEX, DiskStore

WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".safetensors.index.json", ".bin.index.json")
DEFAULT_SHARD_BYTES = 2 << 30  # the export buffers one shard in memory


@dataclass(frozen=True)
class QMatrix:
    """One expert matrix W [N, K] in the store's convention: int4 w = (codes - 8) * scale + zero per group of G
    along K (scale, zero bf16 [N, K/G]); int8 w = codes * scale per output row (scale bf16 [N])."""

    fmt: QFormat
    codes: torch.Tensor             # int4: uint8 [N, K] in 0..15; int8: int8 [N, K]
    scale: torch.Tensor
    zero: torch.Tensor | None = None

    @classmethod
    def from_parts(cls, fmt: QFormat, parts: dict[str, torch.Tensor], N: int, K: int) -> QMatrix:
        codes = unpack_codes(parts, fmt, (N, K))
        if fmt.kind == "int8":
            return cls(fmt, codes.clone(), parts["scales"].clone())
        qsz = parts["qsz"]                                    # [K/G, N, 2] = (scale, zero)
        return cls(fmt, codes, qsz[..., 0].t().contiguous(), qsz[..., 1].t().contiguous())

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def rows(self, start: int, stop: int) -> QMatrix:
        """Output rows start..stop (gate or up out of the fused gate_up record)."""
        return QMatrix(self.fmt, self.codes[start:stop], self.scale[start:stop],
                       None if self.zero is None else self.zero[start:stop])

    def dequantize(self) -> torch.Tensor:
        """fp32 W: the values moe-offload's kernels multiply with (offload.formats.kinds, same arithmetic)."""
        if self.fmt.kind == "int8":
            return self.codes.float() * self.scale.float()[:, None]
        N, K = self.shape
        G = self.fmt.group_size
        q = self.codes.float().view(N, K // G, G)
        return ((q - 8) * self.scale.float()[..., None] + self.zero.float()[..., None]).view(N, K)


@dataclass
class Encoded:
    """One matrix in a target format: its tensors (by suffix after the module name) and the fp32 weights they
    dequantize to under that format's spec."""

    tensors: dict[str, torch.Tensor]
    weight: torch.Tensor


class ExportFormat:
    """A target checkpoint format: which of our kinds it holds, how one matrix maps into it, its config entry."""

    name: str

    def refusal(self, fmt: QFormat) -> str | None:
        """Why experts in `fmt` cannot be exported to this format, with the fix; None if they can."""
        raise NotImplementedError

    def encode(self, m: QMatrix) -> Encoded:
        raise NotImplementedError

    def quantization_config(self, fmt: QFormat, expert_regex: str) -> dict:
        """config.json's `quantization_config`; `expert_regex` matches the expert linears' module names (every
        other module stays dense)."""
        raise NotImplementedError


def pack_le(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes [..., M] -> int32 [..., M * bits / 32], element i at bit (i * bits) % 32 of word
    i * bits // 32 (little-endian): how GPTQ and compressed-tensors pack 4- and 8-bit codes."""
    v = values.to(torch.uint8)
    if bits == 4:
        v = v.view(*v.shape[:-1], -1, 2)
        v = v[..., 0] | (v[..., 1] << 4)
    return v.contiguous().view(torch.int32)


@dataclass
class Deviation:
    """How far the exported expert weights are from the store's (zero points moved onto an integer grid)."""

    err_sq: float = 0.0
    ref_sq: float = 0.0
    max_abs: float = 0.0

    def add(self, got: torch.Tensor, want: torch.Tensor) -> None:
        d = got - want
        self.err_sq += float(d.square().sum())
        self.ref_sq += float(want.square().sum())
        self.max_abs = max(self.max_abs, float(d.abs().max()))

    @property
    def relative_rms(self) -> float:
        return math.sqrt(self.err_sq / self.ref_sq) if self.ref_sq else 0.0


@dataclass
class ExportResult:
    out: Path
    experts: int
    fmt: QFormat
    format_name: str
    shards: int
    nbytes: int
    deviation: Deviation = field(default_factory=Deviation)

    def summary(self) -> str:
        dev = self.deviation
        exact = ("expert weights bit-identical to the store's" if dev.max_abs == 0 else
                 f"zero points rounded to the format's integer grid: expert weights moved by {dev.relative_rms:.2e} "
                 f"relative RMS (max |dw| {dev.max_abs:.2e})")
        return (f"{self.out}: {self.experts} experts as {self.format_name} {self.fmt}, {self.shards} shard(s), "
                f"{self.nbytes / 2**20:.1f} MiB; {exact}")


class ShardWriter:
    """Tensors -> safetensors shards of at most `max_bytes` (a tensor larger than that gets its own shard), named
    and indexed as transformers' save_pretrained does once the count is known."""

    def __init__(self, out: Path, max_bytes: int) -> None:
        self.out, self.max_bytes = out, max_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self.nbytes = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        n = t.numel() * t.element_size()
        if self._pending and self._pending_bytes + n > self.max_bytes:
            self._flush()
        self._pending[name] = t.contiguous()
        self._pending_bytes += n
        self.nbytes += n

    def _flush(self) -> None:
        from safetensors.torch import save_file

        save_file(self._pending, self.out / f"shard-{len(self._shards):05d}.tmp", metadata={"format": "pt"})
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> int:
        """Write the last shard, name them all model-XXXXX-of-YYYYY.safetensors, write the index; returns the count."""
        if self._pending:
            self._flush()
        total = len(self._shards)
        weight_map = {}
        for i, names in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
            os.replace(self.out / f"shard-{i:05d}.tmp", self.out / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.nbytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return total


def export_formats() -> dict[str, ExportFormat]:
    """Every export format by its CLI name."""
    from offload.export.compressed_tensors import CompressedTensors
    from offload.export.gptq import GPTQ

    return {f.name: f for f in (CompressedTensors(), GPTQ())}


def resolve_inputs(path: Path, model: Path | None, store: Path | None) -> tuple[Path, Path]:
    """(store_dir, model_dir) from STORE_OR_MODEL and whichever of --model / --store names the other half."""
    path = Path(path).expanduser()
    if (path / INDEX).is_file():
        if model is None:
            raise OffloadError(f"{path} is a converted store; also pass --model MODEL_DIR, the checkpoint it was "
                               f"converted from (its non-expert weights, config and tokenizer go into the export)")
        return path, Path(model).expanduser()
    if (path / "config.json").is_file():
        if store is None:
            raise OffloadError(f"{path} is a checkpoint; also pass --store STORE_DIR, its converted store (make one "
                               f"with: offload-convert {path} --out STORE_DIR --bits int4-g128)")
        store = Path(store).expanduser()
        if not (store / INDEX).is_file():
            raise OffloadError(f"{store} is not a converted store (no {INDEX}); make it with: offload-convert {path} "
                               f"--out {store} --bits int4-g128 (or --bits int8)")
        return store, path
    raise OffloadError(f"{path} is neither a converted store ({INDEX}) nor a checkpoint (config.json); pass the "
                       f"store written by offload-convert with --model MODEL_DIR, or the checkpoint with --store STORE_DIR")


def export(path: Path, out: Path, format_name: str, model: Path | None = None, store: Path | None = None,
           max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = True) -> ExportResult:
    """Write the export of a store and its checkpoint to `out` (see the module docstring)."""
    from offload.store.source import open_checkpoint

    formats = export_formats()
    if format_name not in formats:
        raise OffloadError(f"unknown export format {format_name!r}; choose one of {', '.join(formats)}")
    target = formats[format_name]
    store_dir, model_dir = resolve_inputs(path, model, store)
    out = Path(out).expanduser()
    if out.exists():
        raise OffloadError(f"{out} already exists; delete it or choose another --out")
    hf_config, arch, source, _top_k = open_checkpoint(model_dir, torch.bfloat16)
    if getattr(hf_config, "quantization_config", None):
        raise OffloadError(f"{model_dir} is already a quantized checkpoint ({hf_config.quantization_config.get('quant_method')}); "
                           f"export from a bf16/fp16/fp32 checkpoint and its store")
    if source.arch.fused or source.arch.pattern == V5_FUSED:
        raise OffloadError(f"{model_dir} keeps its experts fused ({arch.experts_class}); export writes per-expert "
                           f"tensors and supports checkpoints with one tensor per expert and projection (Mixtral, "
                           f"Qwen-MoE, OLMoE, DeepSeek-V2, Phi-MoE)")
    disk = DiskStore(store_dir, direct=False)
    try:
        if disk.index.get("fingerprint") != source.fingerprint():
            raise OffloadError(f"store {store_dir} was not converted from {model_dir} (its experts differ); pass the "
                               f"checkpoint it was made from, or convert this one: offload-convert {model_dir} --out "
                               f"NEW_STORE --bits int4-g128")
        fmt = _single_format(disk, target)
        return _write(disk, source, target, fmt, model_dir, out, max_shard_bytes, progress)
    finally:
        disk.close()


def _single_format(disk: DiskStore, target: ExportFormat) -> QFormat:
    fmts = {parse_format(p) for k in disk.keys() for p in disk.format_of(k).split("/")}
    for f in sorted(fmts, key=str):
        why = target.refusal(f)
        if why:
            raise OffloadError(why)
    if len(fmts) != 1:
        raise OffloadError(f"the store mixes expert formats ({', '.join(sorted(map(str, fmts)))}); export takes one "
                           f"format for every expert: reconvert with a single --bits, e.g. --bits int4-g128")
    return fmts.pop()


def _expert_names(source) -> dict[tuple[int, int, str], str]:
    """(layer, expert, role) -> checkpoint tensor name, for every expert projection."""
    pattern = re.compile(source.arch.pattern)
    names = {}
    for f in source.files:
        for name in _tensor_names(f):
            m = pattern.search(name)
            if m:
                layer, expert, frag = m.groups()
                names[(int(layer), int(expert), source.arch.roles[frag])] = name
    return names


def _tensor_names(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return list(f.keys())


def _write(disk: DiskStore, source, target: ExportFormat, fmt: QFormat, model_dir: Path, out: Path,
           max_shard_bytes: int, progress: bool) -> ExportResult:
    from safetensors import safe_open

    names = _expert_names(source)
    expert_tensors = set(names.values())
    keys = disk.keys()
    if sorted(keys) != sorted(source.keys()):
        raise OffloadError(f"store {disk.dir} holds {len(keys)} experts but {model_dir} has {len(source.keys())}; "
                           f"reconvert the store from this checkpoint")
    partial = out.with_name(out.name + ".partial")
    if partial.exists():  # left by an interrupted export: nothing in it is reused
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    writer = ShardWriter(partial, max_shard_bytes)
    deviation = Deviation()
    others = {f: [n for n in _tensor_names(f) if n not in expert_tensors] for f in source.files}
    specs = {s.name: s for s in source.layout.specs}
    (N2, H), (H2, inter) = specs["gate_up"].shape, specs["down"].shape
    buf = torch.empty(disk.record_bytes, dtype=torch.uint8)
    try:
        with progress_bar("exporting", sum(map(len, others.values())) + len(keys), progress) as step:
            for f, tensor_names in others.items():
                with safe_open(f, "pt") as st:
                    for name in tensor_names:
                        writer.add(name, st.get_tensor(name))
                        step()
            for key in keys:
                disk.read_into(key, buf)
                views = disk.layout_of(key).views(buf)
                parts = {m: {n.split(".", 1)[1]: t for n, t in views.items() if n.startswith(m + ".")}
                         for m in ("gate_up", "down")}
                gate_up = QMatrix.from_parts(fmt, parts["gate_up"], N2, H)
                half = N2 // 2
                for role, m in (("gate", gate_up.rows(0, half)), ("up", gate_up.rows(half, N2)),
                                ("down", QMatrix.from_parts(fmt, parts["down"], H2, inter))):
                    enc = target.encode(m)
                    deviation.add(enc.weight, m.dequantize())
                    module = names[(key[0], key[1], role)].removesuffix(".weight")
                    for suffix, t in enc.tensors.items():
                        writer.add(f"{module}.{suffix}", t)
                step()
        shards = writer.finish()
        config = json.loads((model_dir / "config.json").read_text())
        config["quantization_config"] = target.quantization_config(fmt, _expert_regex(source.arch))
        (partial / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for p in sorted(model_dir.iterdir()):
            if p.is_file() and p.name != "config.json" and not p.name.endswith(WEIGHT_FILES):
                shutil.copy2(p, partial / p.name)
        os.replace(partial, out)
    except OSError as e:
        raise OffloadError(f"cannot write the export in {partial} ({e.strerror}); free space or choose another "
                           f"--out, then rerun") from None
    return ExportResult(out, len(keys), fmt, target.name, shards, writer.nbytes, deviation)


def _expert_regex(arch) -> str:
    """compressed-tensors / gptqmodel style `re:` pattern body over module names matching every expert linear."""
    frags = "|".join(re.escape(r) for r, role in arch.roles.items() if not role.endswith("_bias"))
    return rf".*\.experts\.\d+\.({frags})$"
