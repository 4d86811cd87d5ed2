"""Helpers every offload-bench subcommand shares: list options, capacities, error guard, prompts, timed decode."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from rich.console import Console

from offload.cli.common import fail
from offload.errors import OffloadError

out = Console()


def split_list(values: Optional[list[str]]) -> list[str]:
    return [v.strip() for value in values or [] for v in value.split(",") if v.strip()]


def parse_capacity(value: str) -> int | float:
    """'0.25' or '25%' -> a fraction of all experts; '12' -> 12 slots."""
    try:
        if value.endswith("%"):
            return float(value[:-1]) / 100
        return float(value) if any(c in value for c in ".eE") else int(value)
    except ValueError:
        raise ValueError(f"cannot read capacity {value!r}: write a fraction like 0.25 or 25%, or a slot count like 12")


def capacities(values: Optional[list[str]], default: str) -> list[int | float]:
    caps = [parse_capacity(v) for v in split_list(values) or default.split(",")]
    for c in caps:
        if isinstance(c, float) and not 0.0 < c <= 1.0:
            raise ValueError(f"capacity fraction {c} must be in (0, 1]; pass an integer for a slot count")
        if isinstance(c, int) and c < 1:
            raise ValueError(f"capacity {c} must be at least 1 slot")
    return caps


def label(c: int | float) -> str:
    return f"{c:g}" if isinstance(c, float) else f"{c} slots"


def guard(fn):
    """Run fn(); OffloadError / ValueError / missing files become one red line and exit 2, and so does any other
    file that cannot be read or written (an output path on a read-only filesystem, say)."""
    try:
        return fn()
    except (OffloadError, ValueError, FileNotFoundError, KeyError) as e:
        fail(str(e).strip("'\""))
    except OSError as e:
        fail(f"cannot use {e.filename} ({e.strerror}); check the path and its permissions")


def read_text_file(path: Path, what: str) -> str:
    """The UTF-8 text of the user's `what` file (prompts, held-out text), or an OffloadError naming it."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise OffloadError(f"{what} {path} does not exist; pass an existing UTF-8 text file") from None
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
        raise OffloadError(f"cannot read {what} {path} ({why}); pass a readable UTF-8 text file") from None


def load_trace(path: Path):
    import zipfile

    from cache import Trace

    if not path.exists():
        raise FileNotFoundError(f"trace file {path} does not exist; record one with `offload-bench trace`")
    try:
        return Trace.load(path)
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as e:  # not a zip, truncated, foreign
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise OffloadError(f"{path} is not a readable .npz trace ({first}); record it again with "
                           f"`offload-bench trace`") from None


def total_experts(model_dir: Path) -> int:
    from offload.config import parse_dtype
    from offload.store.source import open_checkpoint

    return len(open_checkpoint(model_dir, parse_dtype("bfloat16"))[2].keys())


def prompt_ids(model, text: Optional[str], n: int, seed: int = 0):
    import torch

    if text is not None and model.tokenizer is not None:
        ids = model.tokenizer(text, return_tensors="pt").input_ids
        if ids.shape[1]:
            return ids
    vocab = model.model.config.get_text_config().vocab_size
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (1, n), generator=g)


def snapshot(model) -> dict:
    model.engine.prefetcher.drain()
    s = model.stats()
    return {"hits": s["hits"], "misses": s["misses"], "bytes": sum(s["bytes_loaded"].values()),
            "stall": s["stall_seconds"], "issued": s["prefetch_issued"], "useful": s["prefetch_useful"]}


def timed(model, ids, n: int, cold: bool) -> tuple[float, dict]:
    from offload.bench.costmodel import timed_generate

    seconds, _ = timed_generate(model, ids, n, cold)
    return seconds, snapshot(model)


def loader_for(models: list, model) -> None:
    """Before timing `model`: stop every other model's loader process and fork its own now, so one loader is
    alive at a time and no fork lands inside a timing (see `Prefetcher.stop_loader`)."""
    for other in models:
        if other is not model:
            other.engine.prefetcher.stop_loader()
    model.engine.prefetcher.start_loader()


def measure_decode(model, ids, n: int, cold: bool = True) -> dict:
    """Decode-only numbers for n tokens: (N+1 new tokens) minus (1 new token), both from the same state."""
    t1, s1 = timed(model, ids, 1, cold)
    tn, sn = timed(model, ids, n + 1, cold)
    d = {k: sn[k] - s1[k] for k in sn}
    dt = max(tn - t1, 1e-9)
    uses = d["hits"] + d["misses"]
    return {"tok_s": n / dt, "hit_rate": d["hits"] / uses if uses else 1.0, "bytes_per_token": d["bytes"] / n,
            "stall_ms_per_token": 1e3 * d["stall"] / n, "prefetch_issued": d["issued"], "prefetch_useful": d["useful"]}
