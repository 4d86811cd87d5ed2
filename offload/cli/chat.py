"""offload-chat: chat in the terminal with a MoE model whose experts are offloaded, or answer one --prompt."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from cache import POLICIES
from offload.cli.common import HELP_OPTIONS, bits_option, fail, load, run_app, version_option
from offload.errors import OffloadError

ONLINE_POLICIES = sorted(set(POLICIES) - {"belady"})  # belady needs the future: it runs only on recorded traces

chat_app = typer.Typer(add_completion=False, context_settings=HELP_OPTIONS,
                       help="Chat with a Mixture-of-Experts model whose experts are offloaded.")


@chat_app.command()
def chat(
    model_dir: Optional[Path] = typer.Argument(None, help="Hugging Face checkpoint directory",
                                               show_default="the shipped demo model"),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="answer this one prompt and exit",
                                         show_default="an interactive chat"),
    system: Optional[str] = typer.Option(None, help="system message", show_default="none"),
    max_new_tokens: int = typer.Option(200, min=1, help="longest answer in tokens"),
    temperature: float = typer.Option(0.7, min=0.0, help="0 = greedy"),
    top_p: float = typer.Option(0.9, min=0.0, max=1.0, help="nucleus sampling: keep the likeliest tokens up to "
                                                            "this probability mass"),
    seed: Optional[int] = typer.Option(None, help="sampling seed (reproducible answers)", show_default="random"),
    device: str = typer.Option("cpu", help="cpu, cuda or cuda:N"),
    dtype: str = typer.Option("bfloat16", help="bfloat16, float16 or float32"),
    cache_experts: Optional[str] = typer.Option(None, help="resident experts: a count (16) or a share of all "
                                                "experts (25%)", show_default="what fits in memory"),
    cache_memory: Optional[str] = typer.Option(None, help="or a memory budget for them: 2GiB, or 25% of all "
                                               "expert bytes", show_default="what fits in memory"),
    store: Optional[str] = typer.Option(None, help="where the experts not resident are read from: ram (the "
                                        "checkpoint's safetensors, read on demand through mmap; the OS page cache is "
                                        "the RAM tier) or disk (a converted store, --store-dir)",
                                        show_default="disk with --store-dir, else ram"),
    store_dir: Optional[Path] = typer.Option(None, help="directory of the disk store (converted on first use)",
                                             show_default="none; needed with --store disk"),
    bits: Optional[str] = typer.Option(None, help="expert format (needs --store disk): 16, 8, 4, 3, 2, ternary, "
                                       "int4-g32, ternary-z90, ...", show_default="16: the checkpoint's dtype"),
    dense_bits: Optional[int] = typer.Option(None, help="non-expert linears (attention, shared experts, lm_head): "
                                             "8 or 4 bits", show_default="the checkpoint's dtype"),
    ram_memory: Optional[str] = typer.Option(None, help="RAM tier of stored records between --store-dir and the "
                                             "device: 64GiB, 50% of all records, or auto (free RAM minus headroom)",
                                             show_default="none on CPU; auto next to a GPU"),
    miss: str = typer.Option("auto", help="a device miss served from RAM: copy (into a device slot), cpu (computed "
                                          "on the CPU where its record lies) or auto (the cost model)"),
    hot_set: Optional[Path] = typer.Option(None, help="a routing trace (.npz, offload-bench trace) or a text to "
                                             "warm up on: its most used experts stay pinned in half the slots", show_default="none"),
    active_experts: Optional[float] = typer.Option(None, help="LExI: per-layer top-k averaging this fraction of the "
                                                   "model's top-k, chosen from the weights alone (0 < F <= 1)",
                                                   show_default="the model's top-k"),
    low_bit_miss: Optional[str] = typer.Option(None, help="HOBBIT: a low-bit copy of every expert in this format "
                                               "(int2-g32, ...; needs --store-dir), computed from RAM on a "
                                               "low-weight miss instead of loading the full record",
                                               show_default="none"),
    low_bit_threshold: Optional[float] = typer.Option(None, help="routing weight below which a miss is served "
                                                      "low-bit", show_default="0.25 with --low-bit-miss"),
    policy: str = typer.Option("lru", help=f"cache eviction policy: {', '.join(ONLINE_POLICIES)}"),
    predictor: Optional[str] = typer.Option(None, help="expert predictor for prefetch: gate, previous, ...",
                                            show_default="none: experts load on demand"),
    lookahead: int = typer.Option(1, help="MoE layers the predictor looks ahead (0: from the layer's own entry, "
                                          "before attention)"),
    context: Optional[int] = typer.Option(None, help="context length to plan the KV cache for",
                                          show_default="the model's maximum, at most 4096"),
    threads: Optional[int] = typer.Option(None, min=1, help="CPU threads for torch", show_default="half the cores"),
    version: bool = version_option(),
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
                     bits=bits_option(bits), dense_bits=dense_bits, ram_memory=ram_memory, miss=miss,
                     hot_set=str(hot_set) if hot_set else None, policy=policy, predictor=predictor, lookahead=lookahead, context=context,
                     active_experts=active_experts, low_bit_miss=low_bit_miss,
                     low_bit_threshold=low_bit_threshold)
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
