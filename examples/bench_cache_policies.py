"""Record a routing trace, compare cache policies on it, then project 24 GB-card speeds from it.

    python examples/bench_cache_policies.py [MODEL_DIR]

MODEL_DIR defaults to the shipped demo model (offload/demo_model), or a tiny random Mixtral built on the fly.
The same three steps as `offload-bench trace`, `offload-bench policies` and `offload-bench project`.
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch
from typer.testing import CliRunner

os.environ.setdefault("COLUMNS", "160")  # before offload.bench.common builds its console: wide tables
from offload.bench.app import app  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "offload" / "demo_model"


def model_dir(work: Path) -> Path:
    if len(sys.argv) > 1:
        return Path(sys.argv[1])
    if (DEMO / "config.json").exists():
        return DEMO
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny_models import build  # a tiny random checkpoint: routing is arbitrary, the plumbing is real

    return build("mixtral", work / "tiny-mixtral", dtype=torch.bfloat16)


def bench(*args: str) -> None:
    result = CliRunner().invoke(app, [str(a) for a in args], terminal_width=160)
    print(result.output)
    if result.exit_code:
        sys.exit(result.exit_code)


def main() -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        path, trace = model_dir(work), work / "trace.npz"
        bench("trace", path, "--prompt", "The capital of France is", "--prompt", "def fibonacci(n):",
              "--max-new-tokens", 32, "--out", trace)
        bench("policies", trace, "--cache-experts", "10%,25%,50%,75%")
        bench("project", "--trace", trace, "--bits", 4, "--machine", "rtx4090")


if __name__ == "__main__":
    main()
