"""What the command-line tools share: the demo model, one-line errors, the printed memory plan, loading.

Every OffloadError becomes one red line and exit code 2; nothing user-caused prints a traceback.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table


DEMO_MODEL = Path(__file__).parent.parent / "demo_model"
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


def bits_option(value: Optional[str]):
    if value is None:
        return None
    return int(value) if value.isdigit() else value


def run_app(app: typer.Typer) -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
