"""The one progress bar of the long steps (converting, calibrating, measuring a bits budget, exporting): a
transient rich bar, or nothing at all when disabled, so library callers and tests see no output."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def progress_bar(label: str, total: int, enabled: bool = True, unit: str = "", completed: int = 0
                 ) -> Iterator[Callable[[int], None]]:
    """Yields advance(n=1). unit="bytes" shows sizes and MB/s; any other unit a count with its rate per second
    (none when unit is empty). `completed` starts a resumed step where it stopped."""
    if not enabled:
        yield lambda n=1: None
        return
    from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeRemainingColumn, TransferSpeedColumn)

    if unit == "bytes":
        counts = (DownloadColumn(), TransferSpeedColumn())
    elif unit:
        counts = (MofNCompleteColumn(), TextColumn(unit), TextColumn("{task.fields[rate]}"))
    else:
        counts = (MofNCompleteColumn(),)
    bar = Progress(TextColumn(label), BarColumn(), *counts, TimeRemainingColumn(), transient=True)
    task = bar.add_task(label, total=total, completed=completed, rate="")
    t0, done = time.perf_counter(), 0

    def advance(n: int = 1) -> None:
        nonlocal done
        done += n
        rate = f"{done / max(time.perf_counter() - t0, 1e-9):.0f} {unit}/s" if unit else ""
        bar.update(task, advance=n, rate=rate)

    bar.start()
    try:
        yield advance
    finally:
        bar.stop()
