"""offload-convert: stream a checkpoint's experts into a checksummed disk store (bounded memory, resumable)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from offload.cli.common import HELP_OPTIONS, bits_option, fail, run_app, version_option
from offload.errors import OffloadError

convert_app = typer.Typer(add_completion=False, context_settings=HELP_OPTIONS,
                          help="Convert a checkpoint's experts into a disk store.")


@convert_app.command()
def convert(
    model_dir: Path = typer.Argument(..., help="Hugging Face checkpoint directory"),
    out: Path = typer.Option(..., "--out", "-o", help="store directory to write (resumes if interrupted)"),
    bits: Optional[str] = typer.Option(None, help="expert format: 16, 8, 4, 3, 2, ternary, int4-g32, ternary-z90, "
                                       "ternary-b1.0 (a bits budget, with --calibration), ...",
                                       show_default="16: the checkpoint's dtype"),
    dtype: str = typer.Option("bfloat16", help="dtype of dense records"),
    calibration: Optional[Path] = typer.Option(None, help="text file: quantize with GPTQ on the activations it "
                                               "routes to each expert (int4/int3/int2, ternary)", show_default="none: weight-only"),
    dense_bits: Optional[int] = typer.Option(None, help="also quantize the non-expert linears (8 or 4) into the "
                                             "store", show_default="none"),
    entropy_coder: str = typer.Option("lzma", help="how sparse ternary (ternary-zNN) records are coded: lzma or "
                                      "dict16 (QMoE's Tunstall dictionary)"),
    version: bool = version_option(),
) -> None:
    """Stream the experts into a checksummed store, one at a time (bounded memory, resumable)."""
    from offload.store.convert import build_store

    try:
        summary = build_store(model_dir, out, bits=bits_option(bits), dtype=dtype,
                              calibration=str(calibration) if calibration else None, entropy_coder=entropy_coder)
        if dense_bits is not None:
            from offload.formats.dense_linears import cache_dense

            summary += "\n" + cache_dense(model_dir, out, bits_option(bits), dtype, dense_bits)
    except OffloadError as e:
        fail(str(e), flags={"store_dir": "--out"})
    Console().print(summary)


def main() -> None:
    run_app(convert_app)
