"""offload-export: a converted store + its checkpoint -> a quantized Hugging Face checkpoint for vLLM / SGLang."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from offload.cli.common import fail, run_app
from offload.errors import OffloadError

export_app = typer.Typer(add_completion=False, help="Export a store's quantized experts as a GPTQ or "
                                                    "compressed-tensors checkpoint (vLLM, SGLang).")


@export_app.command()
def export(
    store_or_model: Path = typer.Argument(..., help="the converted store (then --model) or the checkpoint (then --store)"),
    out: Path = typer.Option(..., "--out", "-o", help="directory to write (must not exist; built in OUT.partial)"),
    format: str = typer.Option(..., "--format", "-f", help="gptq (int4, int8) or compressed-tensors (int8)"),
    model: Optional[Path] = typer.Option(None, help="checkpoint the store was converted from"),
    store: Optional[Path] = typer.Option(None, help="store converted from the checkpoint"),
    max_shard_size: int = typer.Option(2048, help="MiB per safetensors shard (the export holds one in memory)"),
) -> None:
    """Write the store's experts (as stored, mapped into the format) and the checkpoint's other weights."""
    from offload.export import export as run_export

    if max_shard_size <= 0:
        fail(f"--max-shard-size must be a positive number of MiB, got {max_shard_size}")
    try:
        result = run_export(store_or_model, out, format, model=model, store=store, max_shard_bytes=max_shard_size << 20)
    except OffloadError as e:
        fail(str(e))
    Console().print(result.summary(), highlight=False, soft_wrap=True)


def main() -> None:
    run_app(export_app)
