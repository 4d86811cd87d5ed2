"""Prefetcher under stress: random routing, tiny capacity, random load delays, on a real worker thread and in a
real forked loader process (writing into shared slot memory)."""
from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import pytest
import torch

from cache import ExpertCache, make_policy
from offload.errors import OffloadError
from offload.engine.loader import fork_available
from offload.engine.prefetch import Prefetcher
from offload.engine.slots import SlotPool
from offload.engine.stats import EngineStats

RECORD = 64
WORKERS = ["thread", pytest.param("process", marks=pytest.mark.skipif(not fork_available(), reason="needs fork"))]


def make(store, capacity: int, worker: str, stats: EngineStats | None = None):
    cache = ExpertCache(capacity, make_policy("lru"))
    slots = SlotPool(capacity, RECORD, torch.device("cpu"), shared=worker == "process")
    return cache, slots, Prefetcher(store, cache, slots, stats or EngineStats(), worker=worker)


def stopped(pf: Prefetcher) -> bool:
    return getattr(pf.worker, "runner", None) is None and getattr(pf.worker, "loader", None) is None


class StampStore:
    """Writes the key into the record (so a wrong slot is visible) after a random delay."""

    tier = "ram"
    record_bytes = RECORD

    def __init__(self, seed: int, fail_key=None) -> None:
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.fail_key = fail_key
        self.reads = 0

    def read_into(self, key, out: torch.Tensor) -> int:
        with self.lock:
            delay = self.rng.random() * 0.0005
            self.reads += 1
        time.sleep(delay)
        if key == self.fail_key:
            raise OffloadError(f"checksum mismatch for expert {key}")
        out[:RECORD].fill_(0)
        out[0], out[1] = key[0], key[1]
        return RECORD


@pytest.mark.parametrize("worker", WORKERS)
@pytest.mark.parametrize("seed", range(3))
def test_random_routing_no_deadlock_no_double_slot_exact_accounting(seed, worker):
    rng = random.Random(seed)
    layers, experts, k, capacity = 4, 8, 2, 3
    stats = EngineStats()
    cache, slots, pf = make(StampStore(seed), capacity, worker, stats)
    uses = 0
    predicted: dict[int, list] = {}
    for step in range(1500):
        layer = step % layers
        keys = [(layer, e) for e in sorted(rng.sample(range(experts), k))]
        for key in keys:
            cache.pin(key)
        for key in set(predicted.pop(layer, [])) - set(keys):  # as the engine does once the router has chosen
            pf.cancel(key)
        nxt = (layer + 1) % layers
        predicted[nxt] = [(nxt, e) for e in rng.sample(range(experts), rng.randint(0, 3))]
        pf.submit(predicted[nxt])
        if predicted[nxt] and rng.random() < 0.3:  # a withdrawal racing the worker
            pf.cancel(predicted[nxt][-1])
        seen = set()
        for key in keys:
            slot = pf.fetch(key)
            uses += 1
            assert slot not in seen, "one slot handed out for two keys in the same step"
            seen.add(slot)
            assert (int(slots.buf[slot, 0]), int(slots.buf[slot, 1])) == key, "slot holds another expert"
        for key in keys:
            cache.unpin(key)
        assert len(cache) <= capacity
    pf.drain()
    assert not pf._jobs and not getattr(pf.worker, "pending", lambda: 0)(), "a finished, stolen or cancelled job is still tracked"
    pf.close()
    c = cache.stats
    assert c.hits + c.misses == uses
    # every load was a demand miss or a prefetch that was not cancelled before it started
    assert stats.loads == c.misses + stats.prefetch_issued - stats.prefetch_cancelled
    assert stats.prefetch_cancelled > 0
    assert stats.prefetch_useful <= stats.prefetch_issued
    assert stats.prefetch_useful <= c.hits, "a prefetch evicted before use must not count as useful"
    assert not cache.pinned(), "pins leaked"
    assert stopped(pf)


@pytest.mark.parametrize("worker", WORKERS)
def test_worker_error_surfaces_in_caller_with_cause(worker):
    cache, _slots, pf = make(StampStore(0, fail_key=(1, 3)), 4, worker)
    pf.submit([(1, 3)])
    with pytest.raises(OffloadError, match="checksum mismatch for expert \\(1, 3\\)"):
        for _ in range(200):
            time.sleep(0.005)
            pf.fetch((0, 0))  # reaping finished jobs raises the worker's error here
            pf.fetch((1, 3))
    assert (1, 3) not in cache and not cache.pinned()
    pf.close()


@pytest.mark.parametrize("worker", WORKERS)
def test_demand_steals_a_queued_prefetch_and_close_is_clean(worker):
    cache, slots, pf = make(StampStore(1), 8, worker)
    keys = [(0, e) for e in range(8)]
    pf.submit(keys)
    slot = pf.fetch((0, 7))  # last in the queue: loaded at once by the caller, not after the other 7
    assert (int(slots.buf[slot, 0]), int(slots.buf[slot, 1])) == (0, 7)
    runner = pf.worker.runner if worker == "thread" else pf.worker.loader._proc
    pf.close()
    assert runner is not None and not runner.is_alive()
    assert not cache.pinned() and stopped(pf)


class SlowFirstStore(StampStore):
    """The first read takes 0.3 s, so the jobs behind it stay queued."""

    def read_into(self, key, out: torch.Tensor) -> int:
        if key == (0, 0):
            time.sleep(0.3)
        return super().read_into(key, out)


@pytest.mark.parametrize("worker", WORKERS)
def test_cancel_withdraws_a_queued_prefetch_and_never_reads_it(worker):
    stats = EngineStats()
    cache, slots, pf = make(SlowFirstStore(0), 4, worker, stats)
    pf.submit([(0, 0), (0, 1), (0, 2)])
    time.sleep(0.05)  # the worker is inside the slow read of (0, 0)
    assert not pf.cancel((0, 0)), "a read in progress cannot be withdrawn"
    assert pf.cancel((0, 1)) and not pf.cancel((0, 1)) and not pf.cancel((5, 5))
    assert (0, 1) not in cache and (0, 1) not in cache.pinned()
    slot = pf.fetch((0, 2))
    assert (int(slots.buf[slot, 0]), int(slots.buf[slot, 1])) == (0, 2)
    pf.drain()
    assert stats.prefetch_issued == 3 and stats.prefetch_cancelled == 1
    assert stats.loads == 2, "the cancelled prefetch must never be read"
    assert (0, 0) in cache and (0, 1) not in cache
    pf.close()
    assert not cache.pinned() and stopped(pf)


def test_a_dead_loader_process_is_a_clear_error():
    if not fork_available():
        pytest.skip("needs fork")
    cache, _slots, pf = make(StampStore(2), 4, "process")
    pf.submit([(0, 1)])
    pf.drain()
    pf.worker.loader._proc.kill()
    pf.worker.loader._proc.join()
    with pytest.raises(OffloadError, match="loader process died"):
        pf.submit([(0, 2)])
    assert (0, 2) not in cache and not cache.pinned()
    pf.close()


def test_the_loader_process_stops_and_starts_again_with_loads_intact():
    if not fork_available():
        pytest.skip("needs fork")
    cache, slots, pf = make(StampStore(3), 4, "process")
    pf.start_loader()
    first = pf.worker.loader._proc
    assert first.is_alive()
    pf.submit([(0, 1), (0, 2)])
    pf.stop_loader()  # lets both loads land first
    assert pf.worker.loader is None and not first.is_alive() and pf.in_flight() == 0 and not cache.pinned()
    for key in [(0, 1), (0, 2)]:
        assert tuple(slots.buf[cache.slot(key), :2].tolist()) == key
    pf.submit([(1, 3)])  # a fresh loader process
    assert pf.worker.loader is not None and pf.worker.loader._proc is not first
    slot = pf.fetch((1, 3))
    assert tuple(slots.buf[slot, :2].tolist()) == (1, 3)
    assert pf.stats.prefetch_issued == 3 and pf.stats.prefetch_useful == 1
    pf.close()
    assert stopped(pf)


class FastStore(StampStore):
    def read_into(self, key, out: torch.Tensor) -> int:
        out[0], out[1] = key[0] % 256, key[1] % 256
        return RECORD


def test_a_burst_larger_than_the_pipe_buffers_does_not_deadlock():
    """2,000 jobs in one submit: replies pile up while jobs are still being sent (both socket buffers would
    fill and block both processes, were replies not drained before each send)."""
    if not fork_available():
        pytest.skip("needs fork")
    import faulthandler

    n = 2_000
    cache, slots, pf = make(FastStore(0), n, "process")
    faulthandler.dump_traceback_later(120, exit=True)  # a deadlock fails the run instead of hanging it
    try:
        pf.submit([(i // 256, i % 256) for i in range(n)])
        pf.drain()
    finally:
        faulthandler.cancel_dump_traceback_later()
    assert pf.in_flight() == 0 and not cache.pinned()
    slot = cache.slot((3, 7))
    assert (int(slots.buf[slot, 0]), int(slots.buf[slot, 1])) == (3, 7)
    pf.close()


def test_the_loader_process_dies_with_its_parent(tmp_path):
    """kill -9 of the main process leaves no loader process behind."""
    if not fork_available():
        pytest.skip("needs fork")
    import os
    import signal
    import subprocess
    import sys

    script = tmp_path / "main.py"
    script.write_text(
        "import sys, time\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from test_prefetch import make, FastStore\n"
        "cache, slots, pf = make(FastStore(0), 4, 'process')\n"
        "pf.submit([(0, 1)]); pf.drain()\n"
        "print(pf.worker.loader._proc.pid, flush=True)\n"
        "time.sleep(60)\n")
    main = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    loader = int(main.stdout.readline())
    os.kill(main.pid, signal.SIGKILL)
    main.wait()
    for _ in range(100):
        try:
            os.kill(loader, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(loader, signal.SIGKILL)
    pytest.fail("the loader process outlived its parent")
