"""CheckpointSource: one expert at a time, straight out of a Hugging Face checkpoint's safetensors (mmap).

Transformers never sees the expert tensors (they are dropped at construction); we read expert `e` of
layer `l` with one pread (`SafetensorsFile`), so neither loading nor converting a checkpoint pulls all
experts into RAM, not even as mapped pages.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from pathlib import Path

import torch
import xxhash

from offload.store.arch import V5_FUSED, V5_FUSED_ROLES, Arch, arch_for
from offload.errors import OffloadError
from offload.store.hub_formats import Dense, Tensor, hub_format
from offload.store.layout import ExpertLayout, TensorSpec
from offload.store.safetensors_file import SafetensorsFile

Key = tuple[int, int]
SAMPLE_BYTES = 4096  # per sample: one page, so a sample costs one small read
MAX_SAMPLES = 2048   # reads per fingerprint: ~0.5 s from this VM's cold virtio disk, ~30 ms from the page cache


class CheckpointSource:
    """Expert tensors of one checkpoint, in the record orientation transformers uses in memory."""

    def __init__(self, model_dir: Path, arch: Arch, num_experts: int, dtype: torch.dtype,
                 num_layers: int | None = None, fmt: Dense | None = None) -> None:
        """`num_layers`: the model's decoder layers; tensors of extra layers (DeepSeek-V3's MTP layer) are ignored.
        `fmt`: how the checkpoint packs its tensors (`offload.store.hub_formats`; default: as stored)."""
        self.model_dir, self.arch, self.num_experts, self.dtype = Path(model_dir), arch, num_experts, dtype
        self.format, self.num_layers = fmt or Dense(), num_layers
        self.files = sorted(self.model_dir.glob("*.safetensors"))
        if not self.files:
            raise OffloadError(f"no *.safetensors files in {self.model_dir}; moe-offload reads safetensors "
                               f"checkpoints (re-save the model with save_pretrained(safe_serialization=True))")
        self._handles = {f: SafetensorsFile(f) for f in self.files}
        self._tensors: dict[str, Tensor] = self.format.tensors(list(self._handles.values()))  # by logical name
        self._where: dict[tuple, str] = {}  # (layer, expert|None, role) -> logical tensor name
        self._layers_prefix = ""  # names of decoder-layer tensors start with it and the layer number
        self._fingerprint: str | None = None
        self._scan(arch, num_layers)
        if not self._where and not arch.fused:  # saved in transformers v5's in-memory (fused) layout instead
            self.arch = arch = replace(arch, pattern=V5_FUSED, roles=V5_FUSED_ROLES)
            self._scan(arch, num_layers)
        if not self._where:
            raise OffloadError(f"found no expert tensors in {self.model_dir} (expected names like "
                               f"{arch.pattern!r}); is this checkpoint complete?")
        self.layers = sorted({k[0] for k in self._where})
        self.layout = self._dense_layout()

    def _scan(self, arch: Arch, num_layers: int | None) -> None:
        pattern = re.compile(arch.pattern)
        for name in self._tensors:
            if arch.quantized_markers and name.endswith(arch.quantized_markers) and ".experts" in name:
                raise OffloadError(f"{name} is packed (MXFP4/FP8) but config.json has no quantization_config saying "
                                   f"how; restore the checkpoint's original config.json")
            m = pattern.search(name)
            if m:
                g = m.groups()
                layer, expert = int(g[0]), (int(g[1]) if len(g) == 3 else None)
                self._layers_prefix = name[:m.start(1)]
                if num_layers is None or layer < num_layers:
                    self._where[(layer, expert, arch.roles[g[-1]])] = name

    # --- shapes -----------------------------------------------------------------------------------
    def _shape(self, layer: int, role: str) -> tuple[int, ...] | None:
        hit = self._where.get((layer, None if self.arch.fused else 0, role))
        if hit is None:
            return None
        shape = self._tensors[hit].shape
        return shape[1:] if self.arch.fused else shape

    def _dense_layout(self) -> ExpertLayout:
        layer = self.layers[0]
        if self.arch.fused:
            gate_up = self._shape(layer, "gate_up")
        else:
            g = self._shape(layer, "gate")
            gate_up = (2 * g[0], g[1])
        specs = [TensorSpec("gate_up", tuple(gate_up), self.dtype),
                 TensorSpec("down", tuple(self._shape(layer, "down")), self.dtype)]
        for bias in ("gate_up_bias", "down_bias"):
            shape = self._shape(layer, bias)
            if shape is not None:
                specs.append(TensorSpec(bias, tuple(shape), self.dtype))
        return ExpertLayout(tuple(specs))

    def keys(self) -> list[Key]:
        return [(layer, e) for layer in self.layers for e in range(self.num_experts)]

    # --- reading ----------------------------------------------------------------------------------
    def _tensor(self, layer: int, expert: int, role: str) -> tuple[Tensor, int | None]:
        """(tensor, slice index) of one expert's `role` tensor (sliced out of a fused tensor)."""
        hit = self._where.get((layer, None if self.arch.fused else expert, role))
        if hit is None:
            raise OffloadError(f"checkpoint {self.model_dir} lacks tensor {role} of expert {expert} in layer {layer}; "
                               f"the checkpoint is incomplete")
        return self._tensors[hit], expert if self.arch.fused else None

    def _get(self, layer: int, expert: int, role: str) -> torch.Tensor:
        t, index = self._tensor(layer, expert, role)
        return t.read(index, self.dtype)

    def read_into(self, key: Key, views: dict[str, torch.Tensor]) -> int:
        """Expert `key` straight into its record's `views` (one pread per tensor where the checkpoint already
        holds the model dtype, else read and convert or decode): what a RAM-tier miss costs, without the
        intermediate tensors of `read` (on 22 MB experts those made RAM-tier misses ~2x slower than disk-store
        ones). Returns the bytes read from the checkpoint (packed bytes for packed formats)."""
        layer, e = key
        read = 0
        for spec in self.layout.specs:
            dst = views[spec.name]
            if spec.name == "gate_up" and not self.arch.fused:
                half = dst.shape[0] // 2
                parts = (("gate", dst[:half]), ("up", dst[half:]))
            else:
                parts = ((spec.name, dst),)
            for role, out in parts:
                t, index = self._tensor(layer, e, role)
                read += t.read_into(index, out)
        return read

    def read(self, key: Key) -> dict[str, torch.Tensor]:
        """Expert `key` as record tensors (gate_up, down, biases) in the model dtype."""
        layer, e = key
        out = {}
        for spec in self.layout.specs:
            if spec.name == "gate_up" and not self.arch.fused:
                t = torch.cat([self._get(layer, e, "gate"), self._get(layer, e, "up")], 0)
            else:
                t = self._get(layer, e, spec.name)
            out[spec.name] = t.to(self.dtype)
        return out

    def _non_expert(self) -> dict[str, Tensor]:
        """The tensors transformers loads: neither experts nor in a layer past the model's (an MTP layer)."""
        experts = set(self._where.values())
        return {n: t for n, t in self._tensors.items() if n not in experts and not self._past_last_layer(n)}

    def _past_last_layer(self, name: str) -> bool:
        if self.num_layers is None or not name.startswith(self._layers_prefix):
            return False
        head = name[len(self._layers_prefix):].split(".", 1)[0]
        return head.isdigit() and int(head) >= self.num_layers

    def non_expert_bytes(self) -> int:
        """Bytes of every tensor that is not an expert (loaded by transformers), at the model dtype: FP8 projections
        are decoded at load, and scale tensors are part of the tensor they scale."""
        return sum(math.prod(t.shape) * self.dtype.itemsize for t in self._non_expert().values())

    def non_expert_shapes(self) -> dict[str, tuple[int, ...]]:
        """{name: shape} of the tensors transformers loads (neither experts nor past the model's last layer)."""
        return {name: tuple(t.shape) for name, t in self._non_expert().items()}

    def tensor_names(self) -> set[str]:
        """Every tensor name in the checkpoint's files."""
        return {name for h in self._handles.values() for name in h.keys()}

    def non_expert_fingerprint(self) -> str:
        """What a cache of the quantized non-expert weights must match (the expert fingerprint leaves them out):
        their names, dtypes, shapes and bytes sampled like the experts' (at most MAX_SAMPLES reads)."""
        experts = {p.name for n in set(self._where.values()) for p in self._tensors[n].parts()}
        wanted = {h: [(name, None) for name in h.keys() if name not in experts] for h in self._handles.values()}
        count = sum(map(len, wanted.values()))
        per = max(1, min(3, MAX_SAMPLES // max(count, 1)))
        h = xxhash.xxh3_128()
        for f, items in wanted.items():
            for (name, _i), blocks in zip(items, f.samples(items, SAMPLE_BYTES, per)):
                h.update(json.dumps([name, f.tensors[name][:2]]).encode())
                for block in blocks:
                    h.update(block)
        return h.hexdigest()

    def expert_disk_bytes(self) -> int:
        """Bytes the experts take in the checkpoint's files (packed, as published): the RAM tier's store."""
        return sum(self._tensors[name].disk_bytes() for name in set(self._where.values()))

    def finish_load(self, model) -> None:
        """Fix what transformers loaded without the checkpoint's quantizer (decodes FP8 projections in place)."""
        self.format.finish_load(model, self._non_expert())

    def fingerprint(self) -> str:
        """What a converted store must match: the expert tensors' roles, dtypes and shapes, and their bytes sampled
        with at most MAX_SAMPLES preads of SAMPLE_BYTES (xxh3-128), so every open checks it, even of a 100 GB
        checkpoint. Up to ~700 expert tensors (Mixtral-8x22B) every one is sampled at its start, middle and/or end;
        beyond, every role of experts spread evenly over all layers, at the middle. Experts only: config edits or
        other non-expert weights keep a store, a fine-tune of the experts does not. Computed once per source."""
        if self._fingerprint is None:
            roles: dict[int, set[str]] = {}
            for layer, _e, role in self._where:
                roles.setdefault(layer, set()).add(role)
            keys = self.keys()
            per = min(3, MAX_SAMPLES // sum(len(roles[layer]) for layer, _e in keys))
            if per == 0:  # more tensors than reads: every role of evenly spread experts, one block each
                n = MAX_SAMPLES // max(map(len, roles.values()))
                per, keys = 1, [keys[i * len(keys) // n] for i in range(n)]
            wanted: dict[SafetensorsFile, list] = {}  # file -> [(key, tensor name, slice index)]
            for layer, e in keys:
                for role in sorted(roles[layer]):
                    t, index = self._tensor(layer, e, role)
                    for part in t.parts():  # what the files hold: packed blocks and their scales too
                        wanted.setdefault(part.file, []).append(((layer, e, role, part.name), part.name, index))
            sampled = {}
            for f, items in wanted.items():
                blocks = f.samples([(name, index) for _k, name, index in items], SAMPLE_BYTES, per)
                sampled.update({key: (f.tensors[name][:2], b) for (key, name, _i), b in zip(items, blocks)})
            h = xxhash.xxh3_128(json.dumps([self.arch.experts_class, self.num_experts, len(self.keys())]).encode())
            for key in sorted(sampled):
                meta, blocks = sampled[key]
                h.update(json.dumps([key, meta]).encode())
                for block in blocks:
                    h.update(block)
            self._fingerprint = h.hexdigest()
        return self._fingerprint


def check_dir(model_dir) -> Path:
    path = Path(model_dir).expanduser()
    if not path.exists():
        raise OffloadError(f"model directory {path} does not exist; pass a local Hugging Face checkpoint directory")
    if not path.is_dir():
        raise OffloadError(f"{path} is not a directory; pass the checkpoint's directory (with config.json)")
    if not (path / "config.json").is_file():
        raise OffloadError(f"{path} has no config.json; pass a Hugging Face checkpoint directory "
                           f"(config.json + *.safetensors + tokenizer files)")
    return path


def open_checkpoint(model_dir, dtype: torch.dtype):
    """(hf_config, arch, source, top_k) of a local checkpoint, or an OffloadError saying what is wrong."""
    from transformers import AutoConfig

    path = check_dir(model_dir)
    try:
        hf_config = AutoConfig.from_pretrained(path)
    except (ValueError, KeyError, OSError) as e:
        raise OffloadError(f"cannot read {path / 'config.json'}: {str(e).splitlines()[0]}; fix or re-download "
                           f"it") from None
    arch = arch_for(hf_config)
    text = hf_config.get_text_config()
    source = CheckpointSource(path, arch, int(getattr(text, arch.num_experts)), dtype, text.num_hidden_layers,
                              hub_format(hf_config))
    return hf_config, arch, source, int(text.num_experts_per_tok)
