"""offload-bench: record routing traces, compare cache policies on them, project 24 GB-card speeds, and
measure real end-to-end decode on this machine.

  offload-bench trace MODEL_DIR --prompt TEXT --max-new-tokens 64 --out trace.npz
  offload-bench policies trace.npz --cache-experts 10%,25%,50% --json policies.json
  offload-bench project --trace trace.npz --bits 4 --machine rtx4090
  offload-bench run MODEL_DIR --cache-experts 25%,50% --policy lru,score --max-new-tokens 16 --repeats 3
  offload-bench formats MODEL_DIR --bits int8,int4-g32

Cache sizes are --cache-experts (12 slots, or 25% of all experts) and --cache-memory (2GiB, or 25% of all
expert bytes), as in offload-chat. List options take comma-separated values and may be repeated
(--cache-experts 10%,25% --cache-experts 50%); prompts, which may hold commas, are only repeated.
Every user error is one red line and exit code 2.
"""
from __future__ import annotations

import typer

from offload.bench import decode_step, formats, peers, policies, predictors, prefetch, project, run, trace
from offload.cli.common import HELP_OPTIONS, run_app, version_option

app = typer.Typer(add_completion=False, no_args_is_help=True, context_settings=HELP_OPTIONS,
                  help="Benchmarks: routing traces, cache-policy replay, 24 GB-card projections, real decode runs.")
for _module in (trace, policies, project, run, formats, predictors, prefetch, peers, decode_step):
    _module.register(app)


@app.callback()
def _options(version: bool = version_option()) -> None:
    """Benchmarks: routing traces, cache-policy replay, 24 GB-card projections, real decode runs."""


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()
