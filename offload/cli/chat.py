"""offload-chat: chat in the terminal with a MoE model whose experts are offloaded, or answer one --prompt."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from offload.cli.common import bits_option, fail, load, run_app
from offload.errors import OffloadError

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
    store: Optional[str] = typer.Option(None, help="ram (checkpoint, mmap) or disk (converted store) "
                                                   "[default: disk with --store-dir, else ram]"),
    store_dir: Optional[Path] = typer.Option(None, help="directory of the disk store"),
    bits: Optional[str] = typer.Option(None, help="expert format: 16, 8, 4, 3, 2, ternary, int4-g64, ternary-z90, ..."),
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

    from offload.cli.session import Chat, Settings

    console = Console(stderr=prompt is not None)  # with --prompt, stdout carries only the answer
    try:
        model = load(model_dir, console, quiet=False, device=device, dtype=dtype, cache_experts=cache_experts,
                     cache_memory=cache_memory, store=store, store_dir=str(store_dir) if store_dir else None,
                     bits=bits_option(bits), policy=policy, predictor=predictor, lookahead=lookahead, context=context)
        if model.tokenizer is None:
            fail(f"{model.source.model_dir} has no tokenizer files; offload-chat needs the checkpoint's tokenizer")
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


def main() -> None:
    run_app(chat_app)
