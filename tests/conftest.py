"""Shared fixtures: tiny real checkpoints per architecture, built once per session."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import TINY, build  # noqa: E402

torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """tiny_dir(arch, dtype=bf16) -> a saved checkpoint directory, cached per (arch, dtype)."""
    made: dict = {}

    def get(arch: str, dtype: torch.dtype = torch.bfloat16) -> Path:
        key = (arch, dtype)
        if key not in made:
            made[key] = build(arch, tmp_path_factory.mktemp(f"{arch}-{str(dtype)[6:]}"), dtype=dtype)
        return made[key]

    return get


ARCHS = list(TINY)
