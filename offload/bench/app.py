"""offload-bench: record routing traces, compare cache policies on them, project 24 GB-card speeds, and
measure real end-to-end decode on this machine.

  offload-bench trace MODEL_DIR --prompt TEXT --max-new-tokens 64 --out trace.npz
  offload-bench policies trace.npz --capacity 0.1,0.25,0.5 --json policies.json
  offload-bench project --trace trace.npz --bits 4 --machine rtx4090
  offload-bench run MODEL_DIR --capacity 0.25,0.5 --policy lru,score --max-new-tokens 16 --repeats 3

List options take comma-separated values and may be repeated (--capacity 0.1,0.25 --capacity 0.5).
Every user error is one red line and exit code 2.
"""
from __future__ import annotations

import typer

from offload.bench import formats, peers, policies, predictors, prefetch, project, run, trace
from offload.cli.common import run_app

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Benchmarks: routing traces, cache-policy replay, 24 GB-card projections, real decode runs.")
for _module in (trace, policies, project, run, formats, predictors, prefetch, peers):
    _module.register(app)


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()
