"""Helpers every offload-bench subcommand shares: list options, capacities, error guard, prompts, timed decode."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from offload.cli.common import fail
from offload.config import cache_slots, parse_bytes, parse_share
from offload.errors import OffloadError

out = Console()


def split_list(values: Optional[list[str]]) -> list[str]:
    return [v.strip() for value in values or [] for v in value.split(",") if v.strip()]


@dataclass(frozen=True)
class CacheSize:
    """One cache size as given: --cache-experts 12 / 25% (0.25 reads as 25%), or --cache-memory 2GiB / 25%."""

    label: str                     # the row or column name: 12 slots, 25%, 2GiB, mem 25%
    experts: int | str | None = None  # as OffloadConfig's cache_experts
    memory: int | str | None = None   # as its cache_memory

    def slots(self, total: int, expert_bytes: int | None) -> int:
        """Slots out of `total` experts of `expert_bytes` each, as the engine's memory plan counts them."""
        if self.memory is not None and expert_bytes is None:
            raise ValueError(f"--cache-memory {self.label} needs the size of an expert, which this trace does not "
                             f"record; use --cache-experts")
        return cache_slots(self.experts, self.memory, total, expert_bytes or 1)


def cache_experts_option(default: str):
    """--cache-experts as every bench subcommand takes it (a list; `default` when no cache size is given)."""
    return typer.Option(None, "--cache-experts", help="cache sizes in experts, comma-separated: slot counts (12) or "
                                                      "shares of all experts (25%)", show_default=default)


def cache_memory_option():
    """--cache-memory as every bench subcommand takes it."""
    return typer.Option(None, "--cache-memory", help="or cache sizes in memory, comma-separated: 2GiB, 512MB, or "
                                                     "shares of all expert bytes (25%)", show_default="none")


def cache_sizes(experts: Optional[list[str]], memory: Optional[list[str]], default: str) -> list[CacheSize]:
    """The --cache-experts and --cache-memory lists (comma-separated, repeatable); `default` experts if neither."""
    sizes = []
    for v in split_list(experts) or ([] if split_list(memory) else default.split(",")):
        share = _fraction(v)
        if share is not None and 0 < share <= 1:
            sizes.append(CacheSize(f"{100 * share:g}%", experts=f"{100 * share:g}%"))
        elif share is None and v.isdigit() and int(v) >= 1:
            sizes.append(CacheSize(f"{int(v)} slots", experts=int(v)))
        else:
            raise ValueError(f"--cache-experts takes slot counts like 12 or shares of all experts up to 100% like "
                             f"25% (or 0.25), got {v!r}")
    for v in split_list(memory):
        share = parse_share(v)
        if share is None:
            try:
                n = parse_bytes(v)
            except OffloadError:
                n = 0
            if n < 1:
                raise ValueError(f"--cache-memory takes sizes like 2GiB or 512MB, or shares of all expert bytes "
                                 f"like 25%, got {v!r}") from None
            sizes.append(CacheSize(v, memory=n))
        elif 0 < share <= 1:
            sizes.append(CacheSize(f"mem {100 * share:g}%", memory=f"{100 * share:g}%"))
        else:
            raise ValueError(f"--cache-memory shares are of all expert bytes, up to 100%; got {v!r}")
    return sizes


def _fraction(value: str) -> float | None:
    """'25%' or '0.25' -> 0.25; None for a count or nonsense."""
    if value.endswith("%"):
        return parse_share(value)
    try:
        return float(value) if "." in value else None
    except ValueError:
        return None


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


def expert_pool(model_dir: Path) -> tuple[int, int]:
    """(experts in the checkpoint, bytes of one in bfloat16): what a cache size is counted against."""
    from offload.config import parse_dtype
    from offload.store.source import open_checkpoint

    source = open_checkpoint(model_dir, parse_dtype("bfloat16"))[2]
    return len(source.keys()), source.layout.nbytes


def total_experts(model_dir: Path) -> int:
    return expert_pool(model_dir)[0]


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
    """Counters to difference around a timing: a hit is a use served without reading the store (device or
    RAM tier); bytes and stall add up every link (disk -> RAM -> device)."""
    e = model.engine
    e.prefetcher.drain()
    e.loader.drain()
    s = model.stats()
    t, links = s["tiers"], s["links"].values()
    uses = sum(v for k, v in t.items() if k != "cpu_experts")
    misses = uses - t["device_hits"] - t["ram_hits"]
    ram = e.ram.stats if e.ram is not None else None
    return {"hits": uses - misses, "misses": misses, "bytes": sum(v["bytes"] for v in links),
            "stall": sum(v["stall_seconds"] for v in links), "cpu": t["cpu_experts"], "ram_hits": t["ram_hits"],
            "issued": s["prefetch_issued"] + (ram.prefetch_issued if ram else 0),
            "useful": s["prefetch_useful"] + (ram.prefetch_useful if ram else 0)}


def timed(model, ids, n: int, cold: bool) -> tuple[float, dict]:
    from offload.bench.costmodel import timed_generate

    seconds, _ = timed_generate(model, ids, n, cold)
    return seconds, snapshot(model)


def loader_for(models: list, model) -> None:
    """Before timing `model`: stop every other model's loader process and fork its own now, so one loader is
    alive at a time and no fork lands inside a timing (see `Prefetcher.stop_loader`)."""
    for other in models:
        if other is not model:
            other.engine.loader.stop_loader()
    model.engine.loader.start_loader()


def measure_decode(model, ids, n: int, cold: bool = True) -> dict:
    """Decode-only numbers for n tokens: (N+1 new tokens) minus (1 new token), both from the same state."""
    t1, s1 = timed(model, ids, 1, cold)
    tn, sn = timed(model, ids, n + 1, cold)
    d = {k: sn[k] - s1[k] for k in sn}
    dt = max(tn - t1, 1e-9)
    uses = d["hits"] + d["misses"]
    return {"tok_s": n / dt, "hit_rate": d["hits"] / uses if uses else 1.0, "bytes_per_token": d["bytes"] / n,
            "stall_ms_per_token": 1e3 * d["stall"] / n, "prefetch_issued": d["issued"], "prefetch_useful": d["useful"],
            "ram_hit_rate": d["ram_hits"] / uses if uses else 0.0, "cpu_share": d["cpu"] / uses if uses else 0.0}
