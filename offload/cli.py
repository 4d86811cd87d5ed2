"""Command-line entry points: `offload-chat` and `offload-convert` (typer).

Every OffloadError becomes one red line and exit code 2; nothing user-caused prints a traceback.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from offload.errors import OffloadError

DEMO_MODEL = Path(__file__).parent / "demo_model"
err = Console(stderr=True)


def fail(message: str, code: int = 2) -> None:
    err.print(f"[red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def plan_printer(console: Console):
    def show(plan) -> None:
        t = Table(title="memory plan", show_header=False)
        for name, value in plan.rows():
            t.add_row(name, value)
        console.print(t)
    return show


def load(model_dir: Optional[Path], console: Console, quiet: bool = False, **options):
    """Resolve the model directory, print the plan, load with a progress spinner."""
    import logging

    from offload.model import OffloadedModel

    path = model_dir or DEMO_MODEL
    if model_dir is None and not (DEMO_MODEL / "config.json").exists():
        fail(f"the demo model is missing from this installation ({DEMO_MODEL}); pass MODEL_DIR")
    options = {k: v for k, v in options.items() if v is not None}
    logging.getLogger("transformers").setLevel(logging.ERROR)
    console.print(f"loading {path} ...")  # conversion (first use of a disk store) and loading draw their own bars
    return OffloadedModel.from_pretrained(path, progress=not quiet, on_plan=None if quiet else plan_printer(console),
                                          **options)


def _bits(value: Optional[str]):
    if value is None:
        return None
    return int(value) if value.isdigit() else value


chat_app = typer.Typer(add_completion=False, help="Chat with a Mixture-of-Experts model whose experts are offloaded.")


@chat_app.command()
def chat(
    model_dir: Optional[Path] = typer.Argument(None, help="Hugging Face checkpoint directory (default: shipped demo)"),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="answer this one prompt and exit"),
    system: Optional[str] = typer.Option(None, help="system message"),
    max_new_tokens: int = typer.Option(200, min=1, help="longest answer in tokens"),
    temperature: float = typer.Option(0.7, min=0.0, help="0 = greedy"),
    top_p: float = typer.Option(0.9, min=0.0, max=1.0),
    seed: Optional[int] = typer.Option(None, help="sampling seed (reproducible answers)"),
    device: str = typer.Option("cpu", help="cpu, cuda or cuda:N"),
    dtype: str = typer.Option("bfloat16", help="bfloat16, float16 or float32"),
    cache_experts: Optional[int] = typer.Option(None, help="resident expert slots (default: what fits)"),
    cache_memory: Optional[str] = typer.Option(None, help="or a byte budget for them, e.g. 2GiB"),
    store: str = typer.Option("ram", help="ram (checkpoint, mmap) or disk (converted store)"),
    store_dir: Optional[Path] = typer.Option(None, help="directory of the disk store"),
    bits: Optional[str] = typer.Option(None, help="expert format: 16, 8, 4, 3, 2, ternary, int4-g64, ternary-z90, ..."),
    dense_bits: Optional[int] = typer.Option(None, help="non-expert linears (attention, shared experts, lm_head): 8 or 4 bits"),
    policy: str = typer.Option("lru", help="cache eviction policy"),
    predictor: Optional[str] = typer.Option(None, help="expert predictor for prefetch: gate, previous, ..."),
    lookahead: int = typer.Option(1, help="MoE layers the predictor looks ahead (0: from the layer's own entry, before attention)"),
    context: Optional[int] = typer.Option(None, help="context length to plan the KV cache for"),
    threads: Optional[int] = typer.Option(None, min=1, help="CPU threads for torch [default: half the cores]"),
) -> None:
    """Chat in the terminal, or answer one --prompt."""
    import os

    import torch

    # half the cores: single-token matmuls gain little from more, and an oversubscribed CPU spins
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 2) // 2))

    from offload.chat import Chat, Settings

    console = Console(stderr=prompt is not None)  # with --prompt, stdout carries only the answer
    try:
        model = load(model_dir, console, quiet=False, device=device, dtype=dtype, cache_experts=cache_experts,
                     cache_memory=cache_memory, store=store, store_dir=str(store_dir) if store_dir else None,
                     bits=_bits(bits), dense_bits=dense_bits, policy=policy, predictor=predictor, lookahead=lookahead, context=context)
        if model.tokenizer is None:
            fail(f"{model_dir} has no tokenizer files; offload-chat needs the checkpoint's tokenizer")
        if seed is not None:
            torch.manual_seed(seed)
        session = Chat(model, Settings(max_new_tokens, temperature, top_p, system), console=console)
        if prompt is not None:
            session.answer(prompt)
            print()
        else:
            session.repl()
        model.close()
    except OffloadError as e:
        fail(str(e))


convert_app = typer.Typer(add_completion=False, help="Convert a checkpoint's experts into a disk store.")


@convert_app.command()
def convert(
    model_dir: Path = typer.Argument(..., help="Hugging Face checkpoint directory"),
    out: Path = typer.Option(..., "--out", "-o", help="store directory to write (resumes if interrupted)"),
    bits: Optional[str] = typer.Option(None, help="expert format: 16, 8, 4, 3, 2, ternary, int4-g64, ternary-z90, ..."),
    dtype: str = typer.Option("bfloat16", help="dtype of dense records"),
    dense_bits: Optional[int] = typer.Option(None, help="also quantize the non-expert linears (8 or 4) into the store"),
) -> None:
    """Stream the experts into a checksummed store, one at a time (bounded memory, resumable)."""
    from offload.convert import build_store

    try:
        summary = build_store(model_dir, out, bits=_bits(bits), dtype=dtype)
        if dense_bits is not None:
            from offload.dense import cache_dense

            summary += "\n" + cache_dense(model_dir, out, _bits(bits), dtype, dense_bits)
    except OffloadError as e:
        fail(str(e))
    Console().print(summary)


def chat_main() -> None:
    _run(chat_app)


def convert_main() -> None:
    _run(convert_app)


def _run(app: typer.Typer) -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
