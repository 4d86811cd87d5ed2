"""`offload-serve`: load a model with the engine options offload-chat takes and serve OpenAI's API.

Bad input is one red line naming the fix and exit code 2, never a traceback.
"""
from __future__ import annotations

import logging
import os
import socket
import sys
from pathlib import Path
from typing import Optional

import torch
import typer
from rich.console import Console
from rich.table import Table

from offload import OffloadError, OffloadedModel

try:
    from offload.serve.app import create_app
    from offload.serve.runner import run
    from offload.serve.server import Server
except ImportError as missing:  # the `serve` extra is not installed: main() says what to install
    MISSING: str | None = missing.name
else:
    MISSING = None

DEMO_MODEL = Path(__file__).resolve().parent.parent / "demo_model"
err = Console(stderr=True)
app = typer.Typer(add_completion=False, help="Serve a Mixture-of-Experts model (experts offloaded) over OpenAI's API.")


def fail(message: str) -> None:
    err.print(f"[red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def show_plan(plan) -> None:
    table = Table(title="memory plan", show_header=False)
    for name, value in plan.rows():
        table.add_row(name, value)
    err.print(table)


def bits_option(value: Optional[str]) -> int | str | None:
    """--bits 4 means the int 4, --bits ternary the name (as offload-chat reads it)."""
    if value is None:
        return None
    return int(value) if value.isdigit() else value


def bind(host: str, port: int) -> socket.socket:
    """Bind before loading the model, so a taken port fails in a second, not after the load."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        fail(f"cannot listen on {host}:{port} ({e.strerror}); choose another --port or --host")
    sock.listen(2048)
    return sock


@app.command()
def serve(
    model_dir: Optional[Path] = typer.Argument(None, help="Hugging Face checkpoint directory (default: shipped demo)"),
    host: str = typer.Option("127.0.0.1", help="address to listen on (0.0.0.0 exposes it to the network)"),
    port: int = typer.Option(8000, min=0, max=65535, help="TCP port (0: any free one, printed at start)"),
    api_key: Optional[str] = typer.Option(None, envvar="OFFLOAD_API_KEY",
                                          help="require 'Authorization: Bearer KEY' on every route but /health"),
    model_name: Optional[str] = typer.Option(None, help="model id clients ask for [default: the directory name]"),
    max_batch: int = typer.Option(8, min=1, help="sequences decoded together in one forward"),
    max_queue: int = typer.Option(64, min=0, help="requests waiting for a batch slot before 429s"),
    drain_timeout: float = typer.Option(10.0, min=0.0, help="seconds SIGTERM lets running requests finish"),
    device: str = typer.Option("cpu", help="cpu, cuda or cuda:N"),
    dtype: str = typer.Option("bfloat16", help="bfloat16, float16 or float32"),
    cache_experts: Optional[int] = typer.Option(None, help="resident expert slots (default: what fits)"),
    cache_memory: Optional[str] = typer.Option(None, help="or a byte budget for them, e.g. 2GiB"),
    store: str = typer.Option("ram", help="ram (checkpoint, mmap) or disk (converted store)"),
    store_dir: Optional[Path] = typer.Option(None, help="directory of the disk store"),
    bits: Optional[str] = typer.Option(None, help="expert format: 16, 8, 4, 3, 2, ternary, int4-g64, ternary-z90, ..."),
    ram_memory: Optional[str] = typer.Option(None, help="RAM tier in front of the disk store: 64GiB, 50%, auto"),
    miss: str = typer.Option("auto", help="a device miss served from RAM: copy, cpu or auto"),
    hot_set: Optional[Path] = typer.Option(None, help="routing trace (.npz) or warm-up text whose most used experts stay pinned"),
    active_experts: Optional[float] = typer.Option(None, help="LExI: per-layer top-k averaging this fraction of the "
                                                   "model's top-k (0 < F <= 1) [default: the model's top-k]"),
    low_bit_miss: Optional[str] = typer.Option(None, help="HOBBIT: low-bit copies (int2-g32, ...) computed on a "
                                               "low-weight miss [default: none]"),
    low_bit_threshold: Optional[float] = typer.Option(None, help="routing weight below which a miss is served "
                                                      "low-bit [default: 0.25 with --low-bit-miss]"),
    policy: str = typer.Option("lru", help="cache eviction policy"),
    predictor: Optional[str] = typer.Option(None, help="expert predictor for prefetch: gate, previous, ..."),
    lookahead: int = typer.Option(1, help="MoE layers the predictor looks ahead"),
    context: Optional[int] = typer.Option(None, help="context length per sequence (prompt + answer)"),
    threads: Optional[int] = typer.Option(None, min=1, help="CPU threads for torch [default: half the cores]"),
    log_level: str = typer.Option("info", help="uvicorn log level: critical, error, warning, info, debug"),
) -> None:
    """Serve /v1/chat/completions, /v1/completions, /v1/models, /health and /metrics."""
    path = model_dir or DEMO_MODEL
    if not (path / "config.json").exists():
        fail(f"{path} has no config.json; pass the directory of a Hugging Face checkpoint")
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 2) // 2))  # as offload-chat: more cores spin
    sock = bind(host, port)
    options = dict(device=device, dtype=dtype, cache_experts=cache_experts, cache_memory=cache_memory, store=store,
                   store_dir=str(store_dir) if store_dir else None, bits=bits_option(bits), ram_memory=ram_memory, miss=miss,
                   hot_set=str(hot_set) if hot_set else None, policy=policy,
                   predictor=predictor, lookahead=lookahead, context=context, active_experts=active_experts,
                   low_bit_miss=low_bit_miss, low_bit_threshold=low_bit_threshold)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    err.print(f"loading {path} ...")
    try:
        model = OffloadedModel.from_pretrained(path, progress=True, on_plan=show_plan,
                                               **{k: v for k, v in options.items() if v is not None})
        server = Server(model, model_name or path.resolve().name, api_key=api_key, max_batch=max_batch,
                        max_queue=max_queue)
    except OffloadError as e:
        sock.close()
        fail(str(e))
    bound_host, bound_port = sock.getsockname()[:2]
    err.print(f"serving {server.name!r} on http://{bound_host}:{bound_port}/v1"
              + (" (API key required)" if api_key else ""), highlight=False, soft_wrap=True)
    run(create_app(server), server, sock, drain_timeout, log_level)


def main() -> None:
    if MISSING:
        err.print(f"[red]error:[/] offload-serve needs {MISSING}: pip install 'moe-offload[serve]'", highlight=False)
        sys.exit(2)
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
