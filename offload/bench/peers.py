"""offload-bench peers: the same model through transformers, accelerate's disk offload, llama.cpp and moe-offload.

  offload-bench peers [MODEL_DIR] [--gguf FILE ...] [--threads 1] [--max-new-tokens 64] [--repeats 3]
                      [--memory-limit 1GiB] [--json FILE] [--only PATTERN,...] [--sequential]

Without MODEL_DIR a random-weight Mixtral of ~0.8B parameters (hidden 1024, intermediate 3584, 8 layers,
8 experts top-2, 16 heads, 4 kv heads, vocab 32000) is built once into the work dir, bf16, with a small
Llama-style BPE tokenizer (byte fallback) that llama.cpp's `convert_hf_to_gguf.py` accepts.

Every engine setting runs in its own subprocess (so its peak RSS is its own, and so it can sit in its own
memory cgroup); the parent drives them one at a time over a pipe: load, check, warm-up, then the timed
repeats alternate across settings (never two at once), then perplexity. All engines get the same token ids
(tokenized once by the HF tokenizer), greedy decoding, the same max_new_tokens and thread count.

  decode tok/s   N / (t(N+1 new tokens) - t(1 new token)), min_new_tokens=N, eos disabled; median of repeats
  TTFT           t(1 new token): prefill of the prompt plus the first token
  peak RSS       the worker's getrusage(RUSAGE_SELF).ru_maxrss (plus the cgroup's peak, page cache included,
                 under --memory-limit)
  disk B/tok     what the engine itself reads from its disk tier per decoded token (moe-offload:
                 stats bytes_loaded['disk']; accelerate: bytes returned by OffloadedWeightsLoader.__getitem__);
  io B/tok       /proc/self/io read_bytes per decoded token: reads that missed the page cache, any engine
  ppl            perplexity of the held-out text (MODEL_DIR/heldout.txt if present, else a fixed paragraph)
  cos / greedy   last-position logits cosine and leading greedy tokens (of 16) shared with transformers-eager
"""
from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from offload.errors import OffloadError

out = Console()
err = Console(stderr=True)

DEFAULT_SHAPE = dict(hidden_size=1024, intermediate_size=3584, num_hidden_layers=8, num_local_experts=8,
                     num_experts_per_tok=2, num_attention_heads=16, num_key_value_heads=4, vocab_size=32000,
                     max_position_embeddings=4096, tie_word_embeddings=False)
PROMPT_TEXT = ("The old lighthouse keeper climbed the narrow stairs every evening, carrying a lamp and a "
               "notebook in which he wrote down the ships that passed, the weather and the colour of the sea.")
HELDOUT_TEXT = (
    "Rivers shape the land slowly. Over thousands of years a stream can cut a valley through solid rock, carry "
    "sand and gravel far from the mountains, and build wide plains where farmers later plant their fields. "
    "When heavy rain falls, the water rises quickly and may flood the towns along its banks, yet the same "
    "floods leave behind rich soil that feeds the next harvest. People have always settled near rivers, "
    "because they offer water to drink, fish to eat and an easy road for boats that carry goods from one "
    "market to another. Many of the great cities of the world grew up on the bank of a river, and their "
    "bridges, mills and harbours still show how much the life of a city depends on the water that flows "
    "through it.")
# Tokenizer training text for the random model: any English; it only has to give a usable BPE vocabulary.
TOKENIZER_TEXT = [
    PROMPT_TEXT,
    "A quick brown fox jumps over the lazy dog while the farmer watches from the gate of his small house.",
    "In the morning the market opens early; traders bring bread, cheese, apples and fresh fish from the coast.",
    "Scientists measure the speed of light, the weight of stars and the age of the rocks beneath our feet.",
    "She opened the window, looked at the grey sky and decided that today was a good day to stay at home.",
    "Numbers such as 1, 2, 3, 10, 42, 100 and 2024 appear in tables, dates and prices all over the world.",
    "Trains leave the station every hour, and the journey to the city takes about forty minutes by rail.",
    "The committee will meet again next week to discuss the budget, the new school and the repairs to the road.",
]
LLAMA_MISSING = "llama.cpp rows skipped: llama-cpp-python is not installed (pip install 'moe-offload[peers]')"
NO_GGUF = "llama.cpp rows skipped: no --gguf FILE given (see examples/peers/README.md to make them)"
REFERENCE = "transformers-eager"
# The issue-16 comparison: each moe-offload width against llama.cpp at matching bits (and bf16 against the
# eager reference); a peer row that did not run is left out of the ratios.
PEERS = {"bf16": ("llama.cpp-f16", REFERENCE), "int8": ("llama.cpp-Q8_0",),
         "int4": ("llama.cpp-Q4_K_M", "llama.cpp-Q4_0")}


# --- the default subject ---------------------------------------------------------------------------
def work_dir_default() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "moe-offload" / "peers"


def build_tokenizer(vocab_size: int = 2000, pad_to: int | None = None):
    """A Llama-2-style BPE (byte fallback, '▁' for spaces, Sequence decoder): what llama.cpp's converter
    reads as a `llama` vocabulary (gguf.LlamaHfVocab). That path does not pad the vocabulary to the model's
    vocab_size, and llama.cpp sizes its logits by the token list, so `pad_to` fills the vocabulary with
    unreachable `<extra_i>` tokens: logits and perplexity then cover the same 32000 ids in every engine."""
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", *byte_tokens],
                                  show_progress=False)
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")  # merges stay inside words
    tok.train_from_iterator(TOKENIZER_TEXT, trainer)
    spec = json.loads(tok.to_str())
    spec["pre_tokenizer"] = None  # as Llama-2's tokenizer.json; the learned merges never cross a '▁'
    vocab = spec["model"]["vocab"]
    for i in range(len(vocab), pad_to or 0):
        vocab[f"<extra_{i}>"] = i
    tok = Tokenizer.from_str(json.dumps(spec))
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def build_default_model(work_dir: Path, console: Console | None = None) -> Path:
    """The ~0.8B random Mixtral (bf16, save_pretrained + tokenizer), built once into work_dir/mixtral-0.8b."""
    path = work_dir / "mixtral-0.8b-random"
    if (path / "config.json").exists() and (path / "tokenizer.json").exists():
        return path
    import torch
    import transformers as tf

    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    ctx = console.status(f"building the random 0.8B Mixtral into {path} (once) ...") if console else \
        contextlib.nullcontext()
    with ctx:
        cfg = tf.MixtralConfig(**DEFAULT_SHAPE)
        torch.manual_seed(0)
        prev = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            model = tf.MixtralForCausalLM(cfg)
        finally:
            torch.set_default_dtype(prev)
        with torch.no_grad():  # a livelier router than the 0.02 default init: routing differs per token
            for name, p in model.named_parameters():
                if name.endswith("mlp.gate.weight"):
                    p.normal_(0, 0.1)
        model.to(torch.bfloat16).save_pretrained(tmp)
        build_tokenizer(pad_to=cfg.vocab_size).save_pretrained(tmp)
        (tmp / "heldout.txt").write_text(HELDOUT_TEXT + "\n")
        del model
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


# --- settings --------------------------------------------------------------------------------------
@dataclass
class Setting:
    id: str
    engine: str              # transformers, accelerate, llama.cpp, moe-offload
    label: str
    options: dict = field(default_factory=dict)
    lossless: bool = False   # must agree with the reference (same numerics)
    peers: tuple[str, ...] = ()  # ids of the rows whose tok/s this one is divided by (the targets)


def int4_format(model_dir: Path) -> str:
    """int4 with the coarsest group (128, 64, 32) that divides every expert input size (hidden and expert
    intermediate): int4-g128 on the 0.8B Mixtral (1024 = 8 x 128, 3584 = 28 x 128)."""
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    sizes = [cfg.get("hidden_size", 0), cfg.get("moe_intermediate_size") or cfg.get("intermediate_size", 0)]
    return next((f"int4-g{g}" for g in (128, 64, 32) if all(x and x % g == 0 for x in sizes)), "int4-adaptive")


def moe_settings(total: int, store_root: Path, int4: str = "int4-g128") -> list[Setting]:
    def slots(frac: float) -> int:
        return max(1, round(frac * total))

    def disk(bits: int) -> dict:
        fmt = {16: None, 8: 8, 4: int4}[bits]
        return {"store": "disk", "store_dir": str(store_root / (f"bits{bits}" if bits != 4 else int4)), "bits": fmt}

    rows = [Setting("moe-bf16-100%-ram", "moe-offload", "bf16, all resident, ram tier",
                    {"cache_experts": total}, lossless=True, peers=PEERS["bf16"])]
    for frac in (0.5, 0.25):
        pct = f"{frac:.0%}"
        rows.append(Setting(f"moe-bf16-{pct}-ram", "moe-offload", f"bf16, {pct} resident, ram tier",
                            {"cache_experts": slots(frac)}, lossless=True))
        rows.append(Setting(f"moe-bf16-{pct}-disk", "moe-offload", f"bf16, {pct} resident, disk tier",
                            {"cache_experts": slots(frac), **disk(16)}, lossless=True))
    rows.append(Setting("moe-bf16-25%-ram-gate", "moe-offload", "bf16, 25% resident, ram tier, gate predictor",
                        {"cache_experts": slots(0.25), "predictor": "gate"}, lossless=True))
    rows.append(Setting("moe-bf16-25%-disk-gate", "moe-offload", "bf16, 25% resident, disk tier, gate predictor",
                        {"cache_experts": slots(0.25), "predictor": "gate", **disk(16)}, lossless=True))
    rows.append(Setting("moe-bf16-tiers", "moe-offload", "bf16, three tiers: RAM tier sized from free RAM "
                        "(ram_memory=auto, computed in place), the rest on disk", {"ram_memory": "auto", **disk(16)},
                        lossless=True))
    rows.append(Setting("moe-int4-dense4-tiers", "moe-offload", f"{int4} experts and dense_bits=4, three tiers "
                        "(ram_memory=auto)", {"ram_memory": "auto", **disk(4), "dense_bits": 4}))
    for bits in (8, 4):
        rows.append(Setting(f"moe-int{bits}-100%-disk", "moe-offload", f"int{bits}, all resident, disk tier",
                            {"cache_experts": total, **disk(bits)}))
        rows.append(Setting(f"moe-int{bits}-dense{bits}-100%", "moe-offload",
                            f"int{bits} experts and dense_bits={bits}, all resident, disk tier",
                            {"cache_experts": total, **disk(bits), "dense_bits": bits},
                            peers=PEERS[f"int{bits}"]))
        rows.append(Setting(f"moe-int{bits}-25%-disk", "moe-offload", f"int{bits}, 25% resident, disk tier",
                            {"cache_experts": slots(0.25), **disk(bits)}))
        rows.append(Setting(f"moe-int{bits}-25%-disk-gate", "moe-offload",
                            f"int{bits}, 25% resident, disk tier, gate predictor",
                            {"cache_experts": slots(0.25), "predictor": "gate", **disk(bits)}))
    return rows


def all_settings(model_dir: Path, ggufs: list[Path], work: Path) -> tuple[list[Setting], list[str]]:
    from offload.bench.common import total_experts

    notes = []
    rows = [Setting(REFERENCE, "transformers", "bf16, all in RAM, experts_implementation=eager",
                    {"experts_implementation": "eager"}),
            Setting("transformers-default", "transformers", "bf16, all in RAM, default experts kernel", {}),
            Setting("accelerate-disk", "accelerate", "bf16, every layer's mlp.experts on 'disk' (offload_folder)",
                    {})]
    try:
        import llama_cpp  # noqa: F401
        have_llama = True
    except ImportError:
        have_llama = False
    if not ggufs:
        notes.append(NO_GGUF if have_llama else LLAMA_MISSING)
    elif not have_llama:
        notes.append(LLAMA_MISSING)
    else:
        for g in ggufs:
            fmt = _gguf_format(g)
            rows.append(Setting(f"llama.cpp-{fmt}", "llama.cpp", f"{fmt} GGUF ({g.name}), use_mmap=False",
                                {"gguf": str(g)}))
            rows.append(Setting(f"llama.cpp-{fmt}-mmap", "llama.cpp", f"{fmt} GGUF ({g.name}), mmap (llama.cpp's "
                                f"default: pages the weights in and out under a memory limit)",
                                {"gguf": str(g), "mmap": True}))
    key = hashlib.sha1(str(model_dir.resolve()).encode()).hexdigest()[:10]
    rows += moe_settings(total_experts(model_dir), work / "stores" / f"{model_dir.name}-{key}", int4_format(model_dir))
    return rows, notes


def _gguf_format(path: Path) -> str:
    name = path.name.lower()
    for fmt in ("q4_k_m", "q4_k_s", "q4_0", "q5_k_m", "q6_k", "q8_0", "bf16", "f16", "f32"):
        if fmt in name:
            return fmt.upper() if fmt.startswith("q") else fmt
    return path.stem


def heldout_text(model_dir: Path) -> str:
    f = model_dir / "heldout.txt"
    return f.read_text() if f.exists() and f.read_text().strip() else HELDOUT_TEXT


def token_ids(model_dir: Path, text: str, n_random: int, seed: int) -> list[int]:
    """The HF tokenizer's ids for `text` (with BOS when it adds one); random ids when there is none."""
    cfg = json.loads((model_dir / "config.json").read_text())
    vocab = cfg.get("vocab_size") or cfg.get("text_config", {}).get("vocab_size")
    with contextlib.suppress(Exception):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
        ids = tok(text).input_ids
        unk = tok.unk_token_id
        if len(ids) >= 4 and max(ids) < vocab and (unk is None or ids.count(unk) <= len(ids) // 4):
            return ids
    import random

    rng = random.Random(seed)
    return [rng.randrange(3, vocab) for _ in range(n_random)]


# --- memory cgroups --------------------------------------------------------------------------------
class CgroupUnavailable(Exception):
    pass


class MemoryCgroup:
    """A child memory cgroup with a hard limit that counts page cache (v2 memory.max or v1
    memory.limit_in_bytes). Workers join it before exec."""

    def __init__(self, name: str, limit: int) -> None:
        self.limit, self.version, base = limit, *self._base()
        self.path = base / name
        try:
            if self.version == 2:
                ctl = (base / "cgroup.subtree_control").read_text().split()
                if "memory" not in ctl:
                    (base / "cgroup.subtree_control").write_text("+memory")
            self.path.mkdir(exist_ok=True)
            (self.path / ("memory.max" if self.version == 2 else "memory.limit_in_bytes")).write_text(str(limit))
            if self.version == 2 and (self.path / "memory.swap.max").exists():
                (self.path / "memory.swap.max").write_text("0")
        except OSError as e:
            with contextlib.suppress(OSError):
                self.path.rmdir()
            raise CgroupUnavailable(f"cannot create a memory cgroup under {base} ({e.strerror or e})") from None

    @staticmethod
    def _base() -> tuple[int, Path]:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
        root2 = Path("/sys/fs/cgroup")
        if (root2 / "cgroup.controllers").exists():  # unified hierarchy
            if "memory" not in (root2 / "cgroup.controllers").read_text().split():
                raise CgroupUnavailable("cgroup v2 is mounted without the memory controller")
            rel = next((ln.split(":", 2)[2] for ln in lines if ln.startswith("0::")), "/")
            return 2, root2 / rel.lstrip("/")
        for ln in lines:  # v1 (or hybrid): the memory controller's own hierarchy
            _, ctrls, rel = ln.split(":", 2)
            if "memory" in ctrls.split(",") and (root2 / "memory").is_dir():
                return 1, root2 / "memory" / rel.lstrip("/")
        raise CgroupUnavailable("no memory cgroup controller is mounted")

    def join_fn(self):
        procs = str(self.path / "cgroup.procs")
        return lambda: Path(procs).write_text(str(os.getpid()))

    def _read(self, *names: str) -> Optional[str]:
        for n in names:
            with contextlib.suppress(OSError):
                return (self.path / n).read_text()
        return None

    def peak(self) -> Optional[int]:
        v = self._read("memory.peak", "memory.max_usage_in_bytes")
        return int(v) if v and v.strip().isdigit() else None

    def oom_kills(self) -> int:
        text = self._read("memory.events", "memory.oom_control") or ""
        for ln in text.splitlines():
            k, _, v = ln.partition(" ")
            if k == "oom_kill" and v.strip().isdigit():
                return int(v)
        return 0

    def remove(self) -> None:
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


# --- the worker (one engine setting per process) ---------------------------------------------------
def _io_read_bytes() -> int:
    with contextlib.suppress(OSError):
        for ln in Path("/proc/self/io").read_text().splitlines():
            if ln.startswith("read_bytes:"):
                return int(ln.split()[1])
    return 0


class _HF:
    """transformers / accelerate / moe-offload: all are transformers models underneath."""

    def __init__(self, spec: dict) -> None:
        import torch

        self.torch, self.spec = torch, spec
        self.disk_bytes = 0
        self.om = None
        engine, opts, path = spec["engine"], dict(spec["options"]), Path(spec["model_dir"])
        if engine == "moe-offload":
            from offload.model import OffloadedModel

            self.om = OffloadedModel.from_pretrained(path, **opts)
            self.model = self.om.model
        elif engine == "transformers":
            from transformers import AutoModelForCausalLM

            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, **opts).eval()
        elif engine == "accelerate":
            self.model = self._load_accelerate(path, Path(spec["offload_folder"]))
        else:
            raise ValueError(engine)

    def _load_accelerate(self, path: Path, folder: Path):
        import accelerate.utils.offload as aoff
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        orig = aoff.OffloadedWeightsLoader.__getitem__
        me = self

        def counting(loader, key):
            t = orig(loader, key)
            with contextlib.suppress(Exception):
                me.disk_bytes += t.numel() * t.element_size()
            return t

        aoff.OffloadedWeightsLoader.__getitem__ = counting
        cfg = AutoConfig.from_pretrained(path)
        with init_empty_weights():
            skeleton = AutoModelForCausalLM.from_config(cfg)
        device_map = _disk_experts_map(skeleton)
        del skeleton
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        return AutoModelForCausalLM.from_pretrained(path, dtype=self.torch.bfloat16, device_map=device_map,
                                                    offload_folder=str(folder)).eval()

    def loaded(self) -> tuple[int, int]:
        """(bytes read from the disk tier, bytes moved into the fast tier from any tier) so far."""
        if self.om is not None:
            self.om.engine.prefetcher.drain()
            b = self.om.stats()["bytes_loaded"]
            return int(b.get("disk", 0)), int(sum(b.values()))
        return self.disk_bytes, self.disk_bytes

    def _gen(self, ids: list[int], n: int) -> tuple[float, list[int]]:
        torch = self.torch
        x = torch.tensor([ids])
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                                      do_sample=False, eos_token_id=None, pad_token_id=0)
        return time.perf_counter() - t0, out[0, len(ids):].tolist()

    def _cold(self) -> None:
        """Partial caches start each timed run cold (as `offload-bench run` does); all-resident stays warm."""
        if self.om is not None:
            if self.om.stats()["capacity_experts"] < self.om.stats()["total_experts"]:
                self.om.reset_cache()
            else:
                self.om.reset_stats()

    def generate(self, ids: list[int], n: int) -> tuple[float, list[int], int, int]:
        """-> (seconds, new tokens, disk-tier bytes, bytes loaded from any tier) of this run."""
        self._cold()
        d0, l0 = self.loaded()
        dt, toks = self._gen(ids, n)
        d1, l1 = self.loaded()
        return dt, toks, d1 - d0, l1 - l0

    def logits(self, ids: list[int]):
        with self.torch.inference_mode():
            return self.model(self.torch.tensor([ids])).logits[0].float().numpy()


class _Llama:
    def __init__(self, spec: dict) -> None:
        import llama_cpp

        self.n_ctx = int(spec["n_ctx"])
        self.llm = llama_cpp.Llama(model_path=spec["options"]["gguf"], n_ctx=self.n_ctx, n_batch=512,
                                   n_threads=spec["threads"], n_threads_batch=spec["threads"], logits_all=True,
                                   use_mmap=bool(spec["options"].get("mmap")), verbose=False, seed=0)

    def generate(self, ids: list[int], n: int) -> tuple[float, list[int], int, int]:
        self.llm.reset()
        toks, t0 = [], time.perf_counter()
        for tok in self.llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            toks.append(tok)
            if len(toks) >= n:
                break
        return time.perf_counter() - t0, toks, 0, 0

    def logits(self, ids: list[int]):
        import numpy as np

        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[:len(ids)], dtype=np.float32)


def _disk_experts_map(model) -> dict[str, str]:
    """An explicit device_map: each `...experts` module on 'disk', everything else 'cpu' (a catch-all ''
    entry makes accelerate's dispatch fail, see docs/research)."""
    import torch.nn as nn

    def is_experts(name: str, m: nn.Module) -> bool:
        return name.split(".")[-1] == "experts" and any(True for _ in m.parameters())

    def has_experts(m: nn.Module) -> bool:
        return any(is_experts(n, c) for n, c in m.named_modules())

    out_map: dict[str, str] = {}

    def walk(prefix: str, m: nn.Module) -> None:
        for n, c in m.named_children():
            name = f"{prefix}.{n}" if prefix else n
            if is_experts(name, c):
                out_map[name] = "disk"
            elif has_experts(c):
                walk(name, c)
            else:
                out_map[name] = "cpu"
        for n, _ in m.named_parameters(recurse=False):
            out_map[f"{prefix}.{n}" if prefix else n] = "cpu"

    walk("", model)
    return out_map


def _nll(logits, ids: list[int]) -> float:
    import numpy as np

    lg = logits[:-1].astype(np.float64)
    lg = lg - lg.max(axis=1, keepdims=True)
    logp = lg - np.log(np.exp(lg).sum(axis=1, keepdims=True))
    tgt = np.array(ids[1:])
    return float(-logp[np.arange(len(tgt)), tgt].mean())


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker_main(spec_path: str) -> None:
    """Run one engine setting; commands come as JSON lines on stdin, replies go to the original stdout.
    Anything libraries print goes to stderr (the worker log)."""
    reply_fd = os.dup(1)
    os.dup2(2, 1)
    reply = os.fdopen(reply_fd, "w", buffering=1)

    def send(obj) -> None:
        obj.setdefault("rss_mib", _rss_mib())  # every reply: a worker killed later still has its peak so far
        reply.write(json.dumps(obj) + "\n")
        reply.flush()

    spec = json.loads(Path(spec_path).read_text())
    threads = int(spec["threads"])
    if spec["engine"] != "llama.cpp":  # torch's import alone is ~300 MB of RSS: keep it out of llama.cpp's
        import torch

        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    try:
        eng = _Llama(spec) if spec["engine"] == "llama.cpp" else _HF(spec)
    except Exception as e:  # noqa: BLE001 - reported as the row's status
        send({"error": f"load failed: {type(e).__name__}: {e}"})
        return
    send({"ok": True, "load_s": time.perf_counter() - t0, "rss_mib": _rss_mib()})
    prompt, heldout = spec["prompt_ids"], spec["heldout_ids"]
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            op = cmd["op"]
            if op == "check":  # last-position logits of the prompt and the first 16 greedy tokens
                lg = eng.logits(prompt)[-1]
                import numpy as np

                np.save(spec["logits_path"], lg)
                toks = eng.generate(prompt, 16)[1]
                send({"greedy": toks[:16]})
            elif op == "decode":  # both runs from the same state; the difference is decode only
                n = int(cmd["n"])
                io0 = _io_read_bytes()
                t1, _, disk1, load1 = eng.generate(prompt, 1)
                io1 = _io_read_bytes()
                tn, _, diskn, loadn = eng.generate(prompt, n + 1)
                ion = _io_read_bytes()
                send({"tok_s": n / max(tn - t1, 1e-9), "ttft_s": t1, "t1_s": t1, "tn_s": tn,
                      "disk_per_token": max(0, diskn - disk1) / n, "loaded_per_token": max(0, loadn - load1) / n,
                      "io_per_token": max(0, (ion - io1) - (io1 - io0)) / n})
            elif op == "ppl":
                nll = _nll(eng.logits(heldout), heldout)
                send({"nll": nll, "ppl": math.exp(nll), "tokens": len(heldout)})
            elif op == "quit":
                send({"rss_mib": _rss_mib()})
                return
            else:
                send({"error": f"unknown op {op}"})
        except Exception as e:  # noqa: BLE001
            send({"error": f"{op} failed: {type(e).__name__}: {e}"})


class Worker:
    def __init__(self, setting: Setting, spec: dict, work: Path, cgroup: Optional[MemoryCgroup]) -> None:
        self.setting, self.cgroup = setting, cgroup
        self.log_path = work / "logs" / f"{setting.id}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        spec_path = work / "logs" / f"{setting.id}.spec.json"
        spec_path.write_text(json.dumps(spec))
        env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "MKL_NUM_THREADS": str(spec["threads"]),
               "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "offload.bench.peers", str(spec_path)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env=env, preexec_fn=cgroup.join_fn() if cgroup else None)
        self.dead: Optional[str] = None
        self.peak_rss_mib: Optional[float] = None

    def recv(self) -> dict:
        if self.dead:
            return {"error": self.dead}
        line = self.proc.stdout.readline()
        if not line:
            rc = self.proc.wait()
            oom = self.cgroup is not None and (self.cgroup.oom_kills() > 0 or rc == -9)
            tail = " | ".join(self.log_path.read_text().strip().splitlines()[-2:])[-300:]
            self.dead = (f"killed: out of memory under the {_mib(self.cgroup.limit)} limit" if oom else
                         f"worker exited with code {rc}" + (f" ({tail})" if tail else ""))
            return {"error": self.dead}
        r = json.loads(line)
        self.peak_rss_mib = max(self.peak_rss_mib or 0, r.get("rss_mib") or 0) or None
        return r

    def ask(self, op: str, **kw) -> dict:
        if self.dead:
            return {"error": self.dead}
        try:
            self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass
        return self.recv()

    def close(self) -> dict:
        r = self.ask("quit") if not self.dead else {}
        with contextlib.suppress(Exception):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        return r


def _mib(n: Optional[float]) -> str:
    return "-" if n is None else f"{n / 2**20:.0f} MiB"


# --- the driver ------------------------------------------------------------------------------------
def run_peers(model_dir: Path, ggufs: list[Path], threads: int, max_new_tokens: int, repeats: int,
              memory_limit: Optional[int], work: Path, only: list[str], sequential: bool,
              console: Console, group_size: int = 0) -> dict:
    import numpy as np

    settings, notes = all_settings(model_dir, ggufs, work)
    if only:
        settings = [s for s in settings if any(fnmatch.fnmatch(s.id, p) or p == s.engine for p in only)]
        if not settings:
            raise ValueError(f"--only {','.join(only)} matches no setting")
    if any(s.engine == "accelerate" for s in settings):
        notes.append("accelerate runs transformers' default experts kernel: in bf16 it is numerically closer to "
                     "transformers-default than to the eager reference")
    if memory_limit is not None:
        try:
            MemoryCgroup(f"moe-offload-peers-probe-{os.getpid()}", memory_limit).remove()
        except CgroupUnavailable as e:
            notes.append(f"memory-limited scenario skipped: {e}; running without a limit")
            memory_limit = None
    prompt = token_ids(model_dir, PROMPT_TEXT, 32, seed=0)
    heldout = token_ids(model_dir, heldout_text(model_dir), 128, seed=1)[:512]
    logits_dir = work / "logs"
    logits_dir.mkdir(parents=True, exist_ok=True)
    n_ctx = max(len(prompt) + max_new_tokens + 8, len(heldout) + 8, 64)

    def spec(s: Setting) -> dict:
        return {"engine": s.engine, "options": s.options, "model_dir": str(model_dir), "threads": threads,
                "prompt_ids": prompt, "heldout_ids": heldout, "n_ctx": n_ctx,
                "logits_path": str(logits_dir / f"{s.id}.logits.npy"),
                "offload_folder": str(work / "accelerate-offload" / s.id)}

    rows: dict[str, dict] = {s.id: {"id": s.id, "engine": s.engine, "setting": s.label, "options": s.options,
                                     "status": "ok", "samples": []} for s in settings}
    live: dict[str, Worker] = {}
    groups: dict[str, MemoryCgroup] = {}

    def start(s: Setting) -> None:
        cg = None
        if memory_limit is not None:
            cg = groups[s.id] = MemoryCgroup(f"moe-offload-peers-{os.getpid()}-{s.id}", memory_limit)
        with console.status(f"loading {s.id} ..."):
            w = Worker(s, spec(s), work, cg)
            r = w.recv()
        if "error" in r:
            fail_row(s.id, r["error"])
            finish(s.id, w)
            return
        rows[s.id].update(load_s=r["load_s"])
        live[s.id] = w

    def fail_row(sid: str, msg: str) -> None:
        if rows[sid]["status"] == "ok":
            rows[sid]["status"] = msg

    def finish(sid: str, w: Worker) -> None:
        w.close()
        rows[sid]["peak_rss_mib"] = w.peak_rss_mib
        cg = groups.pop(sid, None)
        if cg is not None:
            rows[sid]["cgroup_peak_mib"] = (cg.peak() or 0) / 2**20
            if cg.oom_kills() and rows[sid]["status"] == "ok":
                rows[sid]["status"] = f"killed: out of memory under the {_mib(memory_limit)} limit"
            cg.remove()
        live.pop(sid, None)
        shutil.rmtree(work / "accelerate-offload" / sid, ignore_errors=True)

    def step(sid: str, op: str, **kw) -> Optional[dict]:
        w = live.get(sid)
        if w is None:
            return None
        r = w.ask(op, **kw)
        if "error" in r:
            fail_row(sid, r["error"])
            if w.dead:
                finish(sid, w)
            return None
        return r

    def prepare(sid: str) -> None:
        r = step(sid, "check")
        if r:
            rows[sid]["greedy16"] = r["greedy"]
        step(sid, "decode", n=1)  # discarded: first-call costs stay out of the medians

    def measure(sid: str) -> None:
        r = step(sid, "decode", n=max_new_tokens)
        if r:
            rows[sid]["samples"].append(r)

    def wrap_up(sid: str) -> None:
        r = step(sid, "ppl")
        if r:
            rows[sid].update(ppl=r["ppl"], nll=r["nll"], ppl_tokens=r["tokens"])
        if sid in live:
            finish(sid, live[sid])

    try:
        size = 1 if sequential else (group_size or len(settings))
        for g in range(0, len(settings), size):
            group = settings[g:g + size]
            for s in group:
                start(s)
                with console.status(f"{s.id}: check and warm-up ..."):
                    prepare(s.id)
            for i in range(repeats):
                for s in group:
                    with console.status(f"repeat {i + 1}/{repeats}: {s.id} ..."):
                        measure(s.id)
            for s in group:
                with console.status(f"{s.id}: perplexity ..."):
                    wrap_up(s.id)
    finally:
        for sid, w in list(live.items()):
            with contextlib.suppress(Exception):
                finish(sid, w)
        for cg in groups.values():
            cg.remove()

    ref_logits = None
    ref_path = logits_dir / f"{REFERENCE}.logits.npy"
    if REFERENCE in rows and rows[REFERENCE]["status"] == "ok" and ref_path.exists():
        ref_logits = np.load(ref_path).astype(np.float64)
    for s in settings:
        r = rows[s.id]
        smp = r.pop("samples")
        if smp:
            r["tok_s"] = statistics.median(x["tok_s"] for x in smp)
            r["ttft_s"] = statistics.median(x["ttft_s"] for x in smp)
            for k, name in (("disk_per_token", "disk_bytes_per_token"), ("io_per_token", "io_read_bytes_per_token"),
                            ("loaded_per_token", "loaded_bytes_per_token")):
                r[name] = statistics.median(x[k] for x in smp)
            r["repeats"] = len(smp)
            r["tok_s_all"] = [x["tok_s"] for x in smp]
        lp = logits_dir / f"{s.id}.logits.npy"
        if ref_logits is not None and lp.exists() and r["status"] == "ok":
            lg = np.load(lp).astype(np.float64)
            m = min(len(lg), len(ref_logits))
            a, b = lg[:m], ref_logits[:m]
            r["cosine_vs_ref"] = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
            ref_g, g = rows[REFERENCE].get("greedy16", []), r.get("greedy16", [])
            r["greedy16_match"] = next((i for i, (x, y) in enumerate(zip(ref_g, g)) if x != y),
                                       min(len(g), len(ref_g)))
        with contextlib.suppress(OSError):
            lp.unlink()
    for s in settings:
        mine = rows[s.id].get("tok_s")
        rows[s.id]["vs_peers"] = {p: mine / rows[p]["tok_s"] for p in s.peers
                                  if mine and p in rows and rows[p].get("tok_s")}
    lossless = []
    for s in settings:
        r = rows[s.id]
        if s.lossless and "cosine_vs_ref" in r:
            passed = r["greedy16_match"] == 16 or r["cosine_vs_ref"] >= 0.99
            lossless.append({"subject": s.id, "reference": REFERENCE, "cosine": r["cosine_vs_ref"],
                             "same_greedy_tokens": r["greedy16_match"], "passed": passed})
    return {"model_dir": str(model_dir), "threads": threads, "max_new_tokens": max_new_tokens, "repeats": repeats,
            "memory_limit_bytes": memory_limit, "prompt_tokens": len(prompt), "heldout_tokens": len(heldout),
            "sequential": sequential, "group_size": 1 if sequential else (group_size or len(settings)),
            "notes": notes, "rows": list(rows.values()), "lossless": lossless}


def print_report(res: dict, console: Console) -> None:
    if not console.is_terminal:  # piped or captured: don't squeeze the table into 80 columns
        console = Console(width=200)
    lim = res["memory_limit_bytes"]
    title = (f"peers: {Path(res['model_dir']).name}, {res['threads']} thread(s), {res['max_new_tokens']} new tokens, "
             f"median of {res['repeats']}, prompt {res['prompt_tokens']} tokens, greedy"
             + (f", memory limit {_mib(lim)} (page cache counted)" if lim else ""))
    t = Table(title=title)
    cols = ["setting", "tok/s", "TTFT ms", "peak RSS MiB", "disk KB/tok", "io KB/tok", "ppl", "cos vs ref",
            "greedy =", "status"]
    if lim:
        cols.insert(4, "cgroup peak MiB")
    for c in cols:
        t.add_column(c, justify="left" if c in ("setting", "status") else "right")

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    problems = []
    for r in res["rows"]:
        status = r["status"]
        if status != "ok":
            problems.append(f"[{len(problems) + 1}] {r['id']}: {status}")
            status = f"[red]{'OOM-killed' if status.startswith('killed: out of memory') else 'failed'} " \
                     f"[{len(problems)}][/]"
        vals = [r["id"], f(r.get("tok_s"), ".1f"), f(None if r.get("ttft_s") is None else 1e3 * r["ttft_s"], ".0f"),
                f(r.get("peak_rss_mib"), ".0f"),
                f(None if r.get("disk_bytes_per_token") is None else r["disk_bytes_per_token"] / 1e3, ".0f"),
                f(None if r.get("io_read_bytes_per_token") is None else r["io_read_bytes_per_token"] / 1e3, ".0f"),
                f(r.get("ppl"), ".4g"), f(r.get("cosine_vs_ref"), ".4f"),
                "-" if r.get("greedy16_match") is None else f"{r['greedy16_match']}/16",
                status]
        if lim:
            vals.insert(4, f(r.get("cgroup_peak_mib"), ".0f"))
        t.add_row(*vals)
    console.print(t)
    for row in res["lossless"]:
        mark = "[green]PASS[/]" if row["passed"] else "[red]FAIL[/]"
        console.print(f"lossless check {mark}: {row['subject']} vs {row['reference']}: logits cosine "
                      f"{row['cosine']:.5f}, {row['same_greedy_tokens']}/16 greedy tokens identical", highlight=False)
    for p in problems:
        console.print(escape(p), highlight=False)
    for n in res["notes"]:
        console.print(f"[yellow]{escape(n)}[/]", highlight=False)
    console.print("tok/s = N / (t(N+1 new) - t(1 new)); TTFT = t(1 new); disk KB/tok: the engine's own disk-tier "
                  "reads (moe-offload stats, accelerate OffloadedWeightsLoader); io KB/tok: /proc/self/io read_bytes "
                  "(page-cache misses); ppl on held-out text with the same token ids for every engine; cos/greedy "
                  f"vs {REFERENCE} (last prompt position; leading identical greedy tokens of 16).", highlight=False)


def print_peer_table(runs: list[dict], console: Console) -> None:
    """The issue-16 table: every llama.cpp row and every moe-offload row with peers, at each thread count of
    this invocation, with its perplexity and its tok/s divided by each peer's from the same run."""
    if not console.is_terminal:
        console = Console(width=200)
    t = Table(title="peers at matching bits: tok/s ratio = this row / the peer row, same run and thread count")
    for c in ("setting", "threads", "tok/s", "ppl", "vs peers"):
        t.add_column(c, justify="left" if c in ("setting", "vs peers") else "right")
    shown = 0
    for res in runs:
        for r in res["rows"]:
            if r["engine"] != "llama.cpp" and not r.get("vs_peers") and r["id"] != REFERENCE:
                continue
            ratios = ", ".join(f"{v:.2f}x {k}" for k, v in r.get("vs_peers", {}).items())
            t.add_row(r["id"], str(res["threads"]), "-" if r.get("tok_s") is None else f"{r['tok_s']:.1f}",
                      "-" if r.get("ppl") is None else f"{r['ppl']:.5g}", ratios or "-")
            shown += 1
    if shown:
        console.print(t)


def parse_threads(text: str) -> list[int]:
    """'1' or '1,2' -> [1, 2]: each count is a full pass over the settings, one after the other."""
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise OffloadError(f"--threads takes positive integers, comma-separated (e.g. 1,2), got {text!r}")
    return counts


def register(app: typer.Typer) -> None:
    """Add `peers` to an offload-bench typer app."""

    @app.command()
    def peers(
        model_dir: Optional[Path] = typer.Argument(None, help="HF checkpoint directory",
                                                   show_default="a random 0.8B Mixtral built once in the work dir"),
        gguf: Optional[list[Path]] = typer.Option(None, "--gguf", help="GGUF file(s) of the same model for "
                                                  "llama.cpp, comma-separated or repeated", show_default="none"),
        threads: str = typer.Option("1", help="CPU threads for every engine; a list such as 1,2 runs every "
                                              "setting at each count, one count after the other"),
        max_new_tokens: int = typer.Option(64, min=1, help="tokens decoded per timed run"),
        repeats: int = typer.Option(3, min=1, help="timed runs per setting (medians)"),
        memory_limit: Optional[str] = typer.Option(None, help="run each engine in a memory cgroup of this size "
                                                   "(page cache counted), e.g. 1GiB", show_default="no limit"),
        json_path: Optional[Path] = typer.Option(None, "--json", help="write the results as JSON",
                                                 show_default="no file"),
        only: Optional[list[str]] = typer.Option(None, help="run only settings whose id matches these globs "
                                                            "or engine names (comma-separated), e.g. "
                                                            "'transformers*,moe-bf16-*'", show_default="all"),
        sequential: bool = typer.Option(False, help="load and measure one setting at a time (less memory; "
                                                    "repeats no longer alternate across settings)"),
        group_size: int = typer.Option(0, min=0, help="settings alive (loaded) at once, 0: all of them; repeats "
                                                      "alternate within each group"),
        work_dir: Optional[Path] = typer.Option(None, help="where the default model, disk stores and logs go",
                                                show_default="~/.cache/moe-offload/peers"),
    ) -> None:
        """Side by side on this machine: transformers (all in RAM), accelerate disk offload, llama.cpp (GGUF)
        and moe-offload (resident / 25% / 50%, ram and disk tiers, 16/8/4 bits, with and without the gate
        predictor): decode tok/s, TTFT, peak RSS, disk bytes per token, perplexity, lossless check."""
        from offload.bench.common import guard, split_list
        from offload.config import parse_bytes

        def go():
            work = (work_dir or work_dir_default()).expanduser()
            work.mkdir(parents=True, exist_ok=True)
            path = model_dir
            if path is None:
                path = build_default_model(work, out)
            if not (path / "config.json").exists():
                raise FileNotFoundError(f"{path} has no config.json; pass a Hugging Face checkpoint directory")
            ggufs = [Path(g) for g in split_list([str(g) for g in gguf or []])]
            for g in ggufs:
                if not g.exists():
                    raise FileNotFoundError(f"GGUF file {g} does not exist")
            limit = parse_bytes(memory_limit) if memory_limit else None
            runs = []
            for n in parse_threads(threads):
                res = run_peers(path.resolve(), ggufs, n, max_new_tokens, repeats, limit, work,
                                split_list(only), sequential, out, group_size)
                print_report(res, out)
                runs.append(res)
            print_peer_table(runs, out)
            if json_path is not None:  # one thread count: that run's dict, as before; several: {"runs": [...]}
                json_path.write_text(json.dumps(runs[0] if len(runs) == 1 else {"runs": runs}, indent=1,
                                                default=str))

        guard(go)


if __name__ == "__main__":
    worker_main(sys.argv[1])
