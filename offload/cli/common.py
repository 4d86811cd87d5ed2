"""What the command-line tools share: the demo model, one-line errors in the CLI's words, the printed memory
plan, loading, -h/--version.

Every OffloadError becomes one red line and exit code 2; nothing user-caused prints a traceback.
"""
from __future__ import annotations

import contextlib
import re
import sys
import threading
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table


DEMO_MODEL = Path(__file__).parent.parent / "demo_model"
HELP_OPTIONS = {"help_option_names": ["-h", "--help"]}  # typer's context_settings for every tool
err = Console(stderr=True)

# API option (as OffloadError messages write it: `store_dir=PATH`, `store='disk'`) -> the tools' flag
FLAGS = {"device": "--device", "dtype": "--dtype", "store": "--store", "store_dir": "--store-dir", "bits": "--bits",
         "cache_experts": "--cache-experts", "cache_memory": "--cache-memory", "policy": "--policy",
         "predictor": "--predictor", "lookahead": "--lookahead", "context": "--context",
         "prefetch_width": "--width", "prefetch_min_precision": "--min-precision", "direct_io": "--direct-io",
         "ram_memory": "--ram-memory", "miss": "--miss", "hot_set": "--hot-set",
         "active_experts": "--active-experts", "low_bit_miss": "--low-bit-miss",
         "low_bit_threshold": "--low-bit-threshold"}
_OPTION = re.compile(r"(?<![\w-])(" + "|".join(FLAGS) + r")=('[^']*'|\"[^\"]*\"|[^\s,;)]*[^\s,;).])")


def cli_wording(message: str, flags: Optional[dict[str, str]] = None) -> str:
    """An API message in the CLI's words: `store_dir=PATH` -> `--store-dir PATH`, `store='disk'` -> `--store disk`;
    `flags` overrides the table for one tool (offload-convert's store directory is --out)."""
    table = {**FLAGS, **(flags or {})}

    def flag(m: re.Match) -> str:
        name, value = table[m.group(1)], m.group(2).strip("'\"")
        if value in ("True", "False"):  # a boolean flag: --direct-io / --no-direct-io
            return name if value == "True" else "--no-" + name[2:]
        return f"{name} {value}"

    return _OPTION.sub(flag, message)


def fail(message: str, code: int = 2, flags: Optional[dict[str, str]] = None) -> None:
    err.print(f"[red]error:[/] {escape(cli_wording(message, flags))}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def plan_printer(console: Console):
    def show(plan) -> None:
        t = Table(title="memory plan", show_header=False)
        for name, value in plan.rows():
            t.add_row(name, value)
        console.print(t)
    return show


@contextlib.contextmanager
def delayed_status(console: Console, text: str, delay: float = 1.0):
    """A spinner for a load that takes long; a sub-second load shows nothing."""
    status = console.status(text)
    timer = threading.Timer(delay, status.start)
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        timer.join()
        status.stop()


def load(model_dir: Optional[Path], console: Console, quiet: bool = False, **options):
    """Resolve the model directory, print the plan, load (a spinner if that takes long)."""
    from offload.model import OffloadedModel
    from offload.store.disk import INDEX

    path = model_dir or DEMO_MODEL
    if model_dir is None and not (DEMO_MODEL / "config.json").exists():
        fail(f"the demo model is missing from this installation ({DEMO_MODEL}); pass MODEL_DIR")
    options = {k: v for k, v in options.items() if v is not None}
    store_dir = options.get("store_dir")
    converting = options.get("store") == "disk" and store_dir and not (Path(store_dir) / INDEX).exists()
    # a first use of a disk store draws the converter's own bar, which a spinner would garble
    spinner = contextlib.nullcontext() if quiet or converting else delayed_status(console, f"loading {path} ...")
    with spinner:
        return OffloadedModel.from_pretrained(path, progress=not quiet,
                                              on_plan=None if quiet else plan_printer(console), **options)


def bits_option(value: Optional[str]):
    if value is None:
        return None
    return int(value) if value.isdigit() else value


def _print_version(value: bool) -> None:
    if value:
        try:
            typer.echo(f"moe-offload {version('moe-offload')}")
        except PackageNotFoundError:  # run from a source tree that was never installed
            typer.echo("moe-offload (not installed: no version)")
        raise typer.Exit()


def version_option() -> bool:
    """The --version flag every tool takes (version of the installed moe-offload distribution)."""
    return typer.Option(False, "--version", callback=_print_version, is_eager=True,
                        help="print the moe-offload version and exit")


def run_app(app: typer.Typer) -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
