"""The miss cost model's inputs, measured once at load on this machine (`offload.engine.miss.MissCosts`).

One expert at one token, each median of a few runs: its two matrices computed on the CPU from a RAM record,
the record copied (and turned into compute form) into a device slot, and the same matrices on the device.
The activation between the matrices is left out: it is the same on either side and small next to the GEMVs.
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from offload.engine.miss import MissCosts
from offload.formats.record import MATRICES
from offload.store.disk import aligned_buffer

RUNS = 5


def measure_costs(store, ram, codec, host_codec, device: torch.device, shapes) -> MissCosts:
    """`shapes`: [N, K] of gate_up and down; `codec` / `host_codec` the device's and the RAM tier's record codecs
    (None: dense records)."""
    key = store.keys()[0]
    record = aligned_buffer(store.buffer_bytes)
    store.read_into(key, record)
    cpu_s = _median(_matrices(host_codec, store, key, record, shapes))
    host = record if ram.slots.buf.is_pinned() == record.is_pinned() else record.pin_memory()
    slot = torch.empty(codec.slot_bytes if codec is not None else store.record_bytes, dtype=torch.uint8,
                       device=device)

    def copy() -> None:
        if codec is None:
            slot[: store.record_bytes].copy_(host[: store.record_bytes], non_blocking=True)
        else:
            codec.transform(store.format_of(key), host, slot)
        _sync(device)

    copy_s = _median(copy)
    device_s = _median(_dense_matrices(shapes, device))
    return MissCosts(copy_s=copy_s, cpu_s=cpu_s, device_s=device_s)


def _matrices(codec, store, key, record: torch.Tensor, shapes):
    """A function computing the expert's two matrices on the CPU from `record`, as the RAM tier would."""
    if codec is None:
        return _dense_matrices(shapes, torch.device("cpu"))
    kind = codec.kind_named(store.format_of(key))
    compute = torch.empty(kind.compute.nbytes, dtype=torch.uint8)
    codec.transform(kind.name, record, compute)
    w = kind.split(kind.compute.views(compute))
    xs = [torch.randn(1, k, dtype=torch.bfloat16) for _n, k in shapes]
    return lambda: [kind.linear(x, w, name) for x, name in zip(xs, MATRICES)]


def _dense_matrices(shapes, device: torch.device):
    """A function computing two dense bf16 matrices of `shapes` at one token on `device`."""
    ws = [torch.zeros(n, k, dtype=torch.bfloat16, device=device) for n, k in shapes]
    xs = [torch.randn(1, k, dtype=torch.bfloat16, device=device) for _n, k in shapes]

    def run() -> None:
        for x, w in zip(xs, ws):
            F.linear(x, w)
        _sync(device)
    return run


def _median(fn) -> float:
    fn()  # warm-up: first-call allocations and kernel selection
    times = []
    for _ in range(RUNS):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
