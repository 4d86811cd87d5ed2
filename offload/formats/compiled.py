"""torch.compile for the converter's passes over large matrices, where inductor can build here.

Eager torch makes one pass over memory per operation; inductor fuses a function's operations into a pass or
two (the clip search: 2-3x on one core). Integer results and bf16 roundings are exact
(`emulate_precision_casts`), so compiled and eager code give the same bytes (tests/formats).
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import torch

MIN_WEIGHTS = 1 << 20  # smaller matrices stay eager: a build (~2 s per shape) would cost more than it saves


def _probe(x: torch.Tensor) -> torch.Tensor:
    return x * 2 + 1


@functools.cache
def builds() -> bool:
    """Whether inductor can build a CPU kernel in this process (it needs a C++ compiler): tried once."""
    try:
        torch.compile(_probe, dynamic=False)(torch.ones(3))
    except Exception:  # any failure of the build means: stay eager
        return False
    return True


@functools.cache
def compiled(fn: Callable) -> Callable:
    """`fn` compiled for fixed shapes, with its dtype roundings kept."""
    return torch.compile(fn, dynamic=False, options={"emulate_precision_casts": True})


def for_matrix(fn: Callable, w: torch.Tensor) -> Callable | None:
    """The compiled `fn` for work on the CPU matrix `w` of MIN_WEIGHTS or more, else None (stay eager)."""
    if w.device.type != "cpu" or w.numel() < MIN_WEIGHTS or not builds():
        return None
    return compiled(fn)


def recompiles():
    """Room for one build per shape and format of a conversion (dynamo's default allows 8 per function)."""
    return torch._dynamo.config.patch(recompile_limit=64)
