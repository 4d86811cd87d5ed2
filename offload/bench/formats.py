"""offload-bench formats: what each expert format costs in quality, bytes and speed, measured on one model.

  offload-bench formats MODEL_DIR [--bits bf16,int8,int4-g32,...] [--text FILE] [--tokens 256]
                                  [--repeats 3] [--json FILE] [--work-dir DIR]

Every format is run as the engine runs it: bf16 is the reference (experts dense in the model dtype, read
from the checkpoint, store="ram"); every other format goes through a disk store converted into --work-dir
(one directory per checkpoint fingerprint and format, reused by later runs). All experts are resident
(cache_experts = all), so the numbers are the format's, not the cache's.

1. quality   perplexity on held-out text: the first --text-tokens (2048) tokens, scored with a sliding window
             at the model's context (max_position_embeddings, at most the text) and a stride of half the
             window, every token scored once, each with at least half a window of left context where the text
             allows. Greedy agreement with bf16: --tokens new tokens from the same prompt (the first 32 tokens
             of the held-out text), eos suppressed (min_new_tokens), no repetition penalty; the fraction of
             positions whose token equals bf16's, and the first position where they differ.
             Held-out text: --text FILE, else MODEL_DIR/heldout.txt, else the demo model's
             offload/demo_model/heldout.txt, else an error. Weight error: the relative Frobenius error of the
             stored experts against the checkpoint's, sqrt(sum |W - W_q|^2 / sum |W|^2) over every expert matrix.
2. size      from the store on disk: the largest decoded record, and bits per expert parameter = 8 * (index.json
             + experts.bin bytes) / expert parameters, metadata included (records are stored back to back, each
             only as long as it is); the mean bytes read per expert and how many records are lz4 / lzma.
             Coding: every record re-coded raw, with lz4 and with lzma (the store's filters), against the
             order-0 Shannon entropy of its codes plus its side information (scales, zeros, biases) at their
             raw size; and the load cost per expert (median, page cache warm): one read_into (pread, checksum,
             decode) and the transform into the kernel's layout.
3. speed     decode tokens/s on this CPU for bf16, int8 and one int4 format (the largest group size that fits),
             all loaded at once and measured alternately; decode only: time(N + 1 new tokens) - time(1 new
             token), median of --repeats. Converter: the missing stores are converted in a subprocess (`python
             -c` calling offload.store.convert.build_store per format, after its imports) that reports each conversion's
             wall time and peak RSS: the kernel's high-water mark (VmHWM, reset per format), not ru_maxrss, which
             Linux carries over from the parent across fork + exec. Also its anonymous memory growth, sampled
             every 5 ms: what the converter allocates, without the checkpoint's mmap'd file pages. MB/s counts the
             checkpoint's expert bytes (model dtype). A store reused from an earlier run shows that run's numbers.

Formats whose group size does not divide the experts' input sizes are skipped, with the reason.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from offload.bench.common import read_text_file

DEFAULT_FORMATS = "bf16,int8,int4-g32,int4-g64,int4-g128,int4-adaptive,int3,int2,ternary,ternary-z80,ternary-z90"
TEXT_TOKENS = 2048   # held-out tokens scored per format: a few windows at the model's context, seconds per format
PROMPT_TOKENS = 32   # the agreement / speed prompt: the held-out text's first tokens
HELDOUT = "heldout.txt"
REFERENCE = "bf16"
CONVERT_RECORD = "convert.json"  # per store: the numbers of the subprocess conversion that wrote it

out = Console()
err = Console(stderr=True)

# Runs in a fresh interpreter: imports and the checkpoint's header scan first (not part of converting), then
# build_store per job. Peak RSS is the kernel's high-water mark VmHWM, reset before each job (clear_refs 5).
# Not ru_maxrss: Linux carries a parent's ru_maxrss across fork + exec, so a child started from a bigger
# process (pytest, this benchmark) reports the parent's peak and its own growth reads as zero.
CONVERT_PROBE = r"""
import gc, json, resource, sys, threading, time
from pathlib import Path
import lz4.block, torch, transformers
import offload.formats.record, offload.config, offload.store.convert, offload.store.source, offload.store.disk
from offload.store.source import open_checkpoint

def status():
    try:
        with open("/proc/self/status") as f:
            return {l.split(":")[0]: int(l.split()[1]) * 1024 for l in f if l.startswith(("Vm", "Rss"))}
    except OSError:
        return {}

def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False

def peak():
    s = status()
    if "VmHWM" in s:
        return s["VmHWM"]
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024

jobs = json.loads(sys.argv[1])
torch.set_num_threads(int(sys.argv[2]))
for model_dir in {j["model_dir"] for j in jobs}:
    open_checkpoint(model_dir, torch.bfloat16)
results = []
for job in jobs:
    gc.collect()
    isolated = reset_peak()
    base = status().get("VmRSS", peak()) if isolated else peak()
    anon0 = status().get("RssAnon", 0)
    file0 = status().get("RssFile", 0)
    sampled = {"anon": anon0, "file": file0}
    done = threading.Event()
    def poll():
        while not done.wait(0.005):
            s = status()
            sampled["anon"] = max(sampled["anon"], s.get("RssAnon", 0))
            sampled["file"] = max(sampled["file"], s.get("RssFile", 0))
    th = threading.Thread(target=poll, daemon=True)
    th.start()
    t0 = time.perf_counter()
    offload.store.convert.build_store(job["model_dir"], Path(job["store_dir"]), bits=job["bits"], dtype=job["dtype"],
                                progress=False)
    seconds = time.perf_counter() - t0
    done.set()
    th.join()
    top = peak()
    results.append({"seconds": seconds, "peak_rss": top, "baseline_rss": base, "rss_growth": max(top - base, 0),
                    "anon_growth_sampled": sampled["anon"] - anon0, "file_growth_sampled": sampled["file"] - file0,
                    "isolated": isolated})
print(json.dumps(results))
"""


def register(app: typer.Typer) -> None:
    """Add the `formats` subcommand to an offload-bench typer app (idempotent)."""
    if any((c.name or getattr(c.callback, "__name__", "")) == "formats" for c in app.registered_commands):
        return
    app.command(name="formats")(formats)


# --- the command ---------------------------------------------------------------------------------
def formats(
    model_dir: Path = typer.Argument(..., help="Hugging Face checkpoint directory"),
    bits: Optional[list[str]] = typer.Option(None, "--bits", help="expert formats, comma-separated (bf16 is always "
                                             "measured: the reference)", show_default=DEFAULT_FORMATS),
    text: Optional[Path] = typer.Option(None, help="held-out text file",
                                        show_default="MODEL_DIR/heldout.txt, then the demo model's"),
    tokens: int = typer.Option(256, min=1, help="greedy tokens generated for agreement and for decode speed"),
    repeats: int = typer.Option(3, min=1, help="speed: median of this many alternating runs"),
    json_path: Optional[Path] = typer.Option(None, "--json", help="write the results as JSON", show_default="no file"),
    work_dir: Optional[Path] = typer.Option(None, help="where converted stores are kept and reused",
                                            show_default="~/.cache/moe-offload/bench-formats"),
    text_tokens: int = typer.Option(TEXT_TOKENS, min=2, help="held-out tokens scored for perplexity"),
    threads: int = typer.Option(1, min=1, help="torch CPU threads (and the converter's)"),
) -> None:
    """Quality (perplexity, greedy agreement with bf16), size (bits/param on disk) and CPU speed per expert format."""
    from offload.bench.common import guard, split_list

    def go():
        fmts = parse_formats(split_list(bits) or DEFAULT_FORMATS.split(","))
        wd = work_dir if work_dir is not None else default_work_dir()
        results = measure(model_dir, fmts, text, tokens, repeats, wd, text_tokens, threads)
        print_tables(results)
        if json_path is not None:
            json_path.write_text(json.dumps(results, indent=1, default=str))
            out.print(f"results written to {json_path}", highlight=False)

    guard(go)


def default_work_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "moe-offload" / "bench-formats"


def parse_formats(names: list[str]) -> list[str]:
    """Canonical names ('int4' -> 'int4-g128'), bf16 first, duplicates dropped; a bad name is a FormatError."""
    from offload.formats.quant import parse_format

    canon = [str(parse_format(n)) for n in names]
    return list(dict.fromkeys([REFERENCE, *canon]))


def heldout_path(model_dir: Path, text: Optional[Path]) -> Path:
    from offload.cli.common import DEMO_MODEL

    if text is not None:
        if not text.is_file():
            raise FileNotFoundError(f"held-out text file {text} does not exist")
        return text
    candidates = list(dict.fromkeys(p.resolve() for p in (Path(model_dir) / HELDOUT, DEMO_MODEL / HELDOUT)))
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no held-out text: {' nor '.join(map(str, candidates))} does not exist; pass --text FILE "
                            f"(plain text the model was not trained on)")


def heldout_ids(tokenizer, path: Path, limit: int):
    """The first `limit` tokens of the file as a [1, T] tensor (the text is tokenized as one stream)."""
    import transformers

    text = read_text_file(path, "held-out text file")
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # "longer than model_max_length": we cut it ourselves
    try:
        ids = tokenizer(text[: 32 * limit], return_tensors="pt").input_ids
        if ids.shape[1] < limit and len(text) > 32 * limit:
            ids = tokenizer(text, return_tensors="pt").input_ids
    finally:
        transformers.logging.set_verbosity(verbosity)
    ids = ids[:, :limit]
    if ids.shape[1] < PROMPT_TOKENS // 4 + 2:
        raise ValueError(f"{path} has only {ids.shape[1]} tokens; the benchmark needs a longer held-out text")
    return ids


# --- measurements --------------------------------------------------------------------------------
def perplexity(model, ids, window: int) -> tuple[float, int]:
    """(perplexity, tokens scored) of ids [1, T]: windows of `window` tokens every window // 2 tokens, each token
    scored once, by the first window that contains it beyond the previous window's end."""
    import torch.nn.functional as F

    T = ids.shape[1]
    window = max(2, min(window, T))
    stride = max(1, window // 2)
    nll, n, scored_to = 0.0, 0, 1  # targets [1, scored_to) are done; token 0 has no prediction
    for begin in range(0, T, stride):
        end = min(begin + window, T)
        if end <= scored_to:
            continue
        logits = model(ids[:, begin:end], use_cache=False).logits[0].float()  # [end-begin, V]
        first = scored_to - begin                                              # first target, window coordinates
        targets = ids[0, scored_to:end]
        nll += F.cross_entropy(logits[first - 1: end - begin - 1], targets, reduction="sum").item()
        n += targets.numel()
        scored_to = end
        if end == T:
            break
    return math.exp(nll / n), n


def _gen_kwargs(model, n: int) -> dict:
    pad = model.model.generation_config.pad_token_id
    if isinstance(pad, list):
        pad = pad[0]
    return dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, repetition_penalty=1.0, temperature=None,
                top_p=None, top_k=None, pad_token_id=0 if pad is None else pad)


def greedy(model, prompt, n: int) -> list[int]:
    import torch

    seq = model.generate(prompt, attention_mask=torch.ones_like(prompt), **_gen_kwargs(model, n))
    return seq[0, prompt.shape[1]:].tolist()


def agreement(ref: list[int], got: list[int]) -> tuple[float, Optional[int]]:
    same = [a == b for a, b in zip(ref, got)]
    first = next((i for i, s in enumerate(same) if not s), None)
    if len(ref) != len(got) and first is None:
        first = min(len(ref), len(got))
    return sum(same) / max(len(ref), 1), first


def preload(model) -> None:
    """Load every expert into its slot (cache_experts = all), so no timed step reads the store."""
    e = model.engine
    for key in e.store.keys():
        e.prefetcher.fetch(key)
    e.prefetcher.drain()


def decode_sample(model, prompt, n: int) -> dict:
    """Decode-only tokens/s: time(n + 1 new tokens) - time(1 new token), the same prompt, experts resident."""
    import torch

    def timed(k: int) -> float:
        t0 = time.perf_counter()
        model.generate(prompt, attention_mask=torch.ones_like(prompt), **_gen_kwargs(model, k))
        return time.perf_counter() - t0

    model.reset_stats()
    t1 = timed(1)
    tn = timed(n + 1)
    s = model.stats()
    uses = s["hits"] + s["misses"]
    return {"tok_s": n / max(tn - t1, 1e-9), "hit_rate": s["hits"] / uses if uses else 1.0}


def convert_in_subprocess(jobs: list[dict], threads: int = 1, timeout: Optional[float] = None) -> list[dict]:
    """Run offload.store.convert.build_store for each job ({"model_dir", "store_dir", "bits", "dtype"}) in a fresh
    interpreter (`python -c`), one after another; per job its wall time and memory, in bytes: peak_rss (the
    high-water mark), baseline_rss (RSS before the job), rss_growth, anon_growth_sampled (anonymous memory
    only, sampled every 5 ms: what the converter allocates, without the checkpoint's mmap'd pages)."""
    from offload.errors import OffloadError

    if len(jobs) > 1 and not sys.platform.startswith("linux"):  # no peak reset there: one process per job
        return [r for j in jobs for r in convert_in_subprocess([j], threads, timeout)]
    jobs = [{"dtype": "bfloat16", **j, "model_dir": str(j["model_dir"]), "store_dir": str(j["store_dir"])}
            for j in jobs]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    p = subprocess.run([sys.executable, "-c", CONVERT_PROBE, json.dumps(jobs), str(threads)], capture_output=True,
                       text=True, env=env, timeout=timeout)
    if p.returncode != 0:
        lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
        raise OffloadError(f"the converter subprocess failed ({', '.join(str(j['bits']) for j in jobs)}): "
                           f"{lines[-1] if lines else 'exit code ' + str(p.returncode)}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def store_size(store_dir: Path, params_per_expert: int) -> dict:
    """Sizes measured from the files of a converted store."""
    from offload.store.disk import DATA, INDEX, DiskStore

    store = DiskStore(store_dir, verify=False)
    keys = store.keys()
    n = len(keys)
    disk = (store_dir / INDEX).stat().st_size + (store_dir / DATA).stat().st_size
    codecs = [store.codec_of(k) for k in keys]
    kinds: dict[str, int] = {}
    for k in keys:
        kinds[store.format_of(k)] = kinds.get(store.format_of(k), 0) + 1
    size = {"record_bytes": store.record_bytes, "store_bytes": disk, "index_bytes": (store_dir / INDEX).stat().st_size,
            "data_bytes": (store_dir / DATA).stat().st_size, "experts": n,
            "bits_per_param": 8 * disk / (n * params_per_expert),
            "mean_read_bytes": sum(store.extent(k)[1] for k in keys) / n, "lz4_records": codecs.count("lz4"),
            "lzma_records": codecs.count("lzma"), "kinds": kinds}
    store.close()
    return size


def record_coding(store_dir: Path, source, arch, fmt: str) -> dict:
    """Per store: the experts' relative weight error, each record re-coded (raw, lz4, lzma) against its codes'
    order-0 entropy plus raw side information, in bits (sums over records), and the load cost per expert."""
    import lzma

    import lz4.block
    import torch

    from offload.formats.record import MATRICES, RecordCodec, format_rule
    from offload.formats.quant import dequantize, entropy_bits, unpack_codes
    from offload.store.codec import LZMA_FILTERS
    from offload.store.disk import DiskStore

    store = DiskStore(store_dir)
    codec = RecordCodec(source.layout, format_rule(fmt), arch.transposed, torch.device("cpu"))
    buf = torch.zeros(store.record_bytes, dtype=torch.uint8)
    err = ref = 0.0
    bits = {"raw": 0, "lz4": 0, "lzma": 0, "entropy": 0.0}
    for key in store.keys():
        store.read_into(key, buf)
        kind = codec.kind_named(store.format_of(key))
        record = memoryview(buf[: kind.storage.nbytes].numpy())
        bits["raw"] += 8 * len(record)
        bits["lz4"] += 8 * len(lz4.block.compress(record, store_size=False))
        bits["lzma"] += 8 * len(lzma.compress(record, format=lzma.FORMAT_RAW, filters=LZMA_FILTERS))
        parts, dense = kind.split(kind.storage.views(buf)), source.read(key)
        bits["entropy"] += sum(8 * dense[b.name].nbytes for b in kind.biases)
        for m, q, shape in zip(MATRICES, kind.formats, kind.shapes):
            w = (dense[m].T if arch.transposed else dense[m]).float()
            err += float((dequantize(parts[m], q, shape) - w).square().sum())
            ref += float(w.square().sum())
            coded = set() if q.dense else {"qweight", "qhigh"}  # the rest (scales, zeros) counts at its raw size
            side = sum(t.nbytes for name, t in parts[m].items() if name not in coded)
            bits["entropy"] += 8 * side + (entropy_bits(unpack_codes(parts[m], q, shape)) * w.numel() if coded else 0)
    store.close()
    return {"weight_error": math.sqrt(err / ref), "bits": bits, **load_ms(store_dir, codec)}


def load_ms(store_dir: Path, codec) -> dict:
    """Median ms per expert, page cache warm: read_into (pread + checksum + decode) and the transform into the
    resident form (the kernel's layout), as the prefetcher does on every miss."""
    import torch

    from offload.store.disk import DiskStore

    store = DiskStore(store_dir, direct=False)  # warm page cache: what decoding costs, not the disk
    buf = torch.zeros(store.record_bytes, dtype=torch.uint8)
    slot = torch.zeros(codec.slot_bytes, dtype=torch.uint8)
    read, transform = [], []
    for key in store.keys():
        t0 = time.perf_counter()
        store.read_into(key, buf)
        t1 = time.perf_counter()
        codec.transform(store.format_of(key), buf, slot)
        transform.append(time.perf_counter() - t1)
        read.append(t1 - t0)
    store.close()
    return {"read_ms": 1e3 * statistics.median(read), "to_kernel_ms": 1e3 * statistics.median(transform)}


def skip_reason(fmt: str, source, arch) -> Optional[str]:
    """Why `fmt` cannot hold this model's experts (None: it can)."""
    import torch

    from offload.formats.record import RecordCodec, format_rule
    from offload.errors import OffloadError

    if fmt == REFERENCE:
        return None
    try:
        RecordCodec(source.layout, format_rule(fmt), arch.transposed, torch.device("cpu")).record_bytes
    except OffloadError as e:
        return str(e)
    return None


def speed_formats(ok: list[str]) -> list[str]:
    """bf16, int8 and one int4: the largest group size that fits (then adaptive)."""
    picks = [REFERENCE] + (["int8"] if "int8" in ok else [])
    int4 = next((f for f in ("int4-g128", "int4-g64", "int4-g32", "int4-adaptive") if f in ok), None)
    return picks + ([int4] if int4 else [])


def measure(model_dir: Path, fmts: list[str], text: Optional[Path], tokens: int, repeats: int, work_dir: Path,
            text_tokens: int = TEXT_TOKENS, threads: int = 1) -> dict:
    """Every measurement of the command, as a JSON-ready dict (see the module docstring)."""
    import torch

    from offload.config import parse_dtype
    from offload.errors import OffloadError
    from offload.model import OffloadedModel
    from offload.store.source import open_checkpoint

    torch.set_num_threads(threads)
    model_dir = Path(model_dir)
    hf_config, arch, source, _top_k = open_checkpoint(model_dir, parse_dtype("bfloat16"))
    text_path = heldout_path(model_dir, text)
    keys = source.keys()
    total = len(keys)
    params_per_expert = sum(math.prod(s.shape) for s in source.layout.specs)
    expert_bytes = total * params_per_expert * source.dtype.itemsize  # the checkpoint's experts, model dtype
    store_root = Path(work_dir) / f"{model_dir.resolve().name}-{source.fingerprint()[:12]}"

    rows: dict[str, dict] = {}
    for f in fmts:
        reason = skip_reason(f, source, arch)
        rows[f] = {"format": f, "status": "skipped" if reason else "ok", **({"reason": reason} if reason else {})}
    ok = [f for f in fmts if rows[f]["status"] == "ok"]

    def load(f: str):
        if f == REFERENCE:
            return OffloadedModel.from_pretrained(model_dir, cache_experts=total)
        return OffloadedModel.from_pretrained(model_dir, cache_experts=total, store="disk",
                                              store_dir=str(store_root / f), bits=f)

    # converter: the missing stores, converted in one subprocess; their numbers are kept next to each store
    todo = []
    for f in ok:
        if f != REFERENCE and not ((store_root / f / "index.json").exists()
                                   and (store_root / f"{f}.{CONVERT_RECORD}").exists()):
            shutil.rmtree(store_root / f, ignore_errors=True)  # partial or unmeasured: convert it afresh, measured
            todo.append(f)
    if todo:
        err.print(f"converting {model_dir.name} to {', '.join(todo)} (subprocess) ...", highlight=False)
        done = convert_in_subprocess([{"model_dir": model_dir, "store_dir": store_root / f, "bits": f} for f in todo],
                                     threads=threads)
        for f, r in zip(todo, done):
            (store_root / f"{f}.{CONVERT_RECORD}").write_text(json.dumps({**r, "when": "earlier run"}))
            r["when"] = "this run"
            rows[f]["convert"] = r
    for f in ok:
        if f == REFERENCE:
            continue
        r = rows[f].get("convert") or json.loads((store_root / f"{f}.{CONVERT_RECORD}").read_text())
        r.update(expert_bytes=expert_bytes, mb_s=expert_bytes / 1e6 / max(r["seconds"], 1e-9),
                 growth_fraction=r["rss_growth"] / expert_bytes)
        rows[f]["convert"] = r
        rows[f]["size"] = store_size(store_root / f, params_per_expert)
        rows[f]["coding"] = record_coding(store_root / f, source, arch, f)
    rows[REFERENCE]["size"] = {"record_bytes": source.layout.nbytes, "store_bytes": expert_bytes, "experts": total,
                               "bits_per_param": 8 * source.dtype.itemsize, "mean_read_bytes": source.layout.nbytes,
                               "lz4_records": 0, "lzma_records": 0, "kinds": {"dense checkpoint": total}}
    rows[REFERENCE]["coding"] = {"weight_error": 0.0}

    # quality: one model at a time, bf16 first (its tokens are the reference); the speed formats stay loaded
    speed_fmts = speed_formats(ok)
    kept: dict = {}
    ref_tokens: list[int] = []
    window = ids = prompt = None
    try:
        for f in ok:
            err.print(f"quality: {f} ...", highlight=False)
            model = load(f)
            try:
                if ids is None:
                    if model.tokenizer is None:
                        raise OffloadError(f"{model_dir} has no tokenizer files; perplexity on held-out text needs one")
                    ids = heldout_ids(model.tokenizer, text_path, text_tokens)
                    ctx = getattr(model.model.config.get_text_config(), "max_position_embeddings", None) or ids.shape[1]
                    window = min(int(ctx), ids.shape[1])
                    prompt = ids[:, : min(PROMPT_TOKENS, ids.shape[1] - 1)]
                ppl, scored = perplexity(model, ids, window)
                toks = greedy(model, prompt, tokens)
            finally:
                if f in speed_fmts:
                    kept[f] = model
                else:
                    model.close()
            if f == REFERENCE:
                ref_tokens = toks
            agree, first = agreement(ref_tokens, toks)
            rows[f].update(perplexity=ppl, agreement=agree, first_divergence=first)

        # speed: bf16, int8, int4 loaded together, every expert resident, measured alternately
        err.print(f"speed: {', '.join(speed_fmts)} x {repeats} ...", highlight=False)
        models = [kept[f] for f in speed_fmts]
        for m in models:
            preload(m)
            decode_sample(m, prompt, min(tokens, 4))  # discarded: first-call costs stay out of the medians
        samples: list[list[dict]] = [[] for _ in models]
        for _ in range(repeats):
            for i, m in enumerate(models):
                samples[i].append(decode_sample(m, prompt, tokens))
    finally:
        for m in kept.values():
            m.close()
    speed = []
    for f, s in zip(speed_fmts, samples):
        speed.append({"format": f, "tok_s": statistics.median(x["tok_s"] for x in s),
                      "samples": [x["tok_s"] for x in s], "hit_rate": min(x["hit_rate"] for x in s)})
    for r in speed:
        r["vs_bf16"] = r["tok_s"] / speed[0]["tok_s"]

    return {"model": str(model_dir), "work_dir": str(store_root), "torch_threads": threads,
            "experts": total, "params_per_expert": params_per_expert, "expert_bytes": expert_bytes,
            "expert_shapes": {s.name: list(s.shape) for s in source.layout.specs},
            "text": {"path": str(text_path), "tokens_scored": scored, "tokens": int(ids.shape[1]), "window": window,
                     "stride": max(1, window // 2), "prompt_tokens": int(prompt.shape[1])},
            "tokens": tokens, "repeats": repeats,
            "formats": rows, "skipped": {f: r["reason"] for f, r in rows.items() if r["status"] == "skipped"},
            "speed": speed}


# --- output --------------------------------------------------------------------------------------
def _mb(n: float) -> str:
    return f"{n / 1e6:.2f}"


def print_coding(res: dict, rows: list[dict]) -> None:
    """Each store's records re-coded, in bits per expert parameter (data file only, no index), and load costs."""
    params = res["experts"] * res["params_per_expert"]
    c = Table(title="coding: bits/param of the records (data file, index excluded): stored as-is, lz4, lzma, what the "
                    "store holds, and the order-0 entropy of the codes + raw side info; load ms per expert (median, "
                    "page cache warm)")
    for col in ("format", "raw", "lz4", "lzma", "stored", "entropy", "stored / entropy", "read+decode ms",
                "to kernel ms"):
        c.add_column(col, justify="left" if col == "format" else "right")
    for r in rows:
        b, z = r["coding"]["bits"], r["size"]
        stored = 8 * z["data_bytes"] / params
        c.add_row(r["format"], *(f"{b[k] / params:.3f}" for k in ("raw", "lz4", "lzma")), f"{stored:.3f}",
                  f"{b['entropy'] / params:.3f}", f"{stored / (b['entropy'] / params):.3f}",
                  f"{r['coding']['read_ms']:.3f}", f"{r['coding']['to_kernel_ms']:.3f}")
    out.print(c)


def print_tables(res: dict) -> None:
    rows = res["formats"]
    ok = [r for r in rows.values() if r["status"] == "ok"]
    name = Path(res["model"]).name
    t_ = res["text"]
    ref = rows[REFERENCE]["perplexity"]

    q = Table(title=f"quality: {name}, perplexity on {t_['tokens_scored']} held-out tokens ({Path(t_['path']).name}; "
                    f"window {t_['window']}, stride {t_['stride']}); greedy agreement with bf16 over {res['tokens']} "
                    f"new tokens")
    for col in ("format", "perplexity", "vs bf16", "agreement", "first divergence", "bits/param", "weight error"):
        q.add_column(col, justify="left" if col == "format" else "right")
    for r in ok:
        fd = r["first_divergence"]
        q.add_row(r["format"], f"{r['perplexity']:.3f}", f"{100 * (r['perplexity'] / ref - 1):+.2f}%",
                  f"{r['agreement']:.1%}", "-" if fd is None else str(fd), f"{r['size']['bits_per_param']:.3f}",
                  f"{r['coding']['weight_error']:.3f}")
    out.print(q)

    s = Table(title=f"size: measured from the store on disk ({res['experts']} experts x {res['params_per_expert']:,} "
                    f"params); bits/param = 8 x (index.json + experts.bin) / expert params")
    for col in ("format", "record bytes", "store MB", "bits/param", "mean read bytes", "lz4 records", "lzma records",
                "record kinds"):
        s.add_column(col, justify="left" if col in ("format", "record kinds") else "right")
    for r in ok:
        z = r["size"]
        kinds = ", ".join(f"{k} x{v}" for k, v in z["kinds"].items()) if len(z["kinds"]) > 1 or r["format"] in (
            REFERENCE,) or "adaptive" in r["format"] else ""
        s.add_row(r["format"], f"{z['record_bytes']:,}", _mb(z["store_bytes"]), f"{z['bits_per_param']:.3f}",
                  f"{z['mean_read_bytes']:,.0f}", f"{z['lz4_records']}/{z['experts']}",
                  f"{z['lzma_records']}/{z['experts']}", kinds)
    out.print(s)
    print_coding(res, [r for r in ok if r["format"] != REFERENCE])

    d = Table(title=f"decode speed on this CPU ({res['torch_threads']} thread(s)): all experts resident, {res['tokens']} "
                    f"new tokens, decode only, median of {res['repeats']}, alternating")
    for col in ("format", "tok/s", "vs bf16", "runs tok/s", "hit rate"):
        d.add_column(col, justify="left" if col == "format" else "right")
    for r in res["speed"]:
        d.add_row(r["format"], f"{r['tok_s']:.1f}", f"{r['vs_bf16']:.2f}x", " ".join(f"{x:.1f}" for x in r["samples"]),
                  f"{r['hit_rate']:.0%}")
    out.print(d)

    c = Table(title=f"converter (subprocess, offload.store.convert.build_store): {_mb(res['expert_bytes'])} MB of checkpoint "
                    f"experts; peak RSS (VmHWM) and its growth during the conversion")
    for col in ("format", "seconds", "MB/s", "peak RSS MB", "RSS growth MB", "growth / expert bytes",
                "anon growth MB (sampled)", "measured"):
        c.add_column(col, justify="left" if col in ("format", "measured") else "right")
    for r in ok:
        v = r.get("convert")
        if v is None:
            continue
        c.add_row(r["format"], f"{v['seconds']:.2f}", f"{v['mb_s']:.1f}", _mb(v["peak_rss"]), _mb(v["rss_growth"]),
                  f"{v['growth_fraction']:.1%}", _mb(v["anon_growth_sampled"]), v["when"])
    out.print(c)
    for f, why in res["skipped"].items():
        out.print(f"[yellow]skipped {f}:[/] {why}", highlight=False)
