"""LoaderProcess: the prefetcher's CPU loads in a forked process, so they never contend for the GIL.

A Python thread that reads and decodes experts while the main thread computes competes with it for the
GIL at every torch op (docs/architecture.md has the measurement). The process inherits the store (open descriptors,
mmaps) and writes straight into the slot pool, which lives in shared memory (`SlotPool(shared=True)`).

Jobs and completions travel through shared memory, never through a pipe: a job is a slot number in a
ring plus that slot's key and sequence number; a completion is a slot number in a second ring plus its
byte count and time. Pickling and a pipe round trip cost about what a prefetched small expert saves,
so the hot path is a few shared-memory stores and one semaphore post (the
semaphores are wake-up hints only: the rings are the truth). Only an exception travels through a pipe.
Jobs are claimed under one shared lock: a job the main thread needs before the process reaches it is
stolen (demand beats prefetch), and a sequence number per slot makes a stale ring entry harmless.
"""
from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import pickle
import signal
import sys
import time
from collections.abc import Callable

from offload.errors import OffloadError

QUEUED, RUNNING, STOLEN, DONE, FAILED = range(5)
POLL_SECONDS = 0.05  # how often a main process waiting on a job checks that the loader is still alive
# Neither process spins on the rings: each sleeps on a semaphore as soon as it has nothing to do. Waking a
# sleeper costs an inter-processor interrupt, but on two CPUs spinning costs more: a spinning loader competes
# with the kernel's disk completions and with the main process.

Fill = Callable[[tuple[int, int], int], int]  # (key, slot) -> bytes read from the store


def fork_available() -> bool:
    """Forking is safe with torch on CPU on Linux (DataLoader workers do it); elsewhere use a thread."""
    return sys.platform.startswith("linux") and "fork" in mp.get_all_start_methods()


class _Shared:
    """The memory both processes see. Per slot: its job's sequence number, state, key and result; a job
    ring (main -> loader) and a completion ring (loader -> main), each with a head its writer advances."""

    def __init__(self, ctx, capacity: int) -> None:
        self.capacity = capacity
        self.seq = ctx.RawArray("q", capacity)
        self.state = ctx.RawArray("b", capacity)
        self.key = ctx.RawArray("q", 2 * capacity)
        self.nbytes = ctx.RawArray("q", capacity)
        self.seconds = ctx.RawArray("d", capacity)
        # A slot holds at most one live job, so at most `capacity` completions are unread; stale job
        # entries (stolen jobs) can add more, and a full job ring makes `submit` refuse (never overwrite).
        self.jobs = ctx.RawArray("i", 4 * capacity + 16)
        self.jobs_head, self.jobs_tail = ctx.RawValue("q", 0), ctx.RawValue("q", 0)
        self.done = ctx.RawArray("i", capacity + 1)
        self.done_head = ctx.RawValue("q", 0)
        self.stop = ctx.RawValue("b", 0)
        self.lock = ctx.Lock()
        self.work = ctx.Semaphore(0)      # posted per job: the loader sleeps on it when its ring is empty
        self.finished = ctx.Semaphore(0)  # posted per completion: a main process waiting on a job sleeps on it


class LoaderProcess:
    def __init__(self, fill: Fill, capacity: int) -> None:
        ctx = mp.get_context("fork")
        self._sh = sh = _Shared(ctx, capacity)
        self._errors, child = ctx.Pipe(duplex=False)  # loader -> main: (seq, exception), rare
        self._done_tail = 0
        self._failures: dict[int, BaseException] = {}  # errors read ahead of their completion
        self._replies: list = []  # completions read while waiting for another job, handed out next
        self._next = 0
        self._proc = ctx.Process(target=_serve, args=(sh, child, fill), name="moe-offload-loader", daemon=True)
        self._proc.start()
        child.close()

    def submit(self, key: tuple[int, int], slot: int) -> int:
        """Queue a load of `key` into `slot`; returns the job's sequence number (0: the job ring is full,
        nothing was queued)."""
        sh = self._sh
        if not self._proc.is_alive():
            raise self._died()
        with sh.lock:
            head = sh.jobs_head.value
            if head - sh.jobs_tail.value >= len(sh.jobs):
                return 0
            self._next += 1
            sh.seq[slot], sh.state[slot] = self._next, QUEUED
            sh.key[2 * slot], sh.key[2 * slot + 1] = key
            sh.jobs[head % len(sh.jobs)] = slot
            sh.jobs_head.value = head + 1
        sh.work.release()
        return self._next

    def steal(self, slot: int) -> bool:
        """Take back the job of `slot` if the process has not started it (the caller then loads it)."""
        sh = self._sh
        with sh.lock:
            if sh.state[slot] == QUEUED:
                sh.state[slot] = STOLEN
                return True
        return False

    def completions(self, until: int | None = None) -> list[tuple[int, int, float, BaseException | None]]:
        """(seq, bytes, seconds, error) of finished jobs: those ready now, and with `until`, every one up to
        and including job `until` (blocking until it is done)."""
        self._read_done()
        while until is not None and not self._has(until):
            self._sleep(until)
            self._read_done()
        out, self._replies = self._replies, []
        return out

    def _has(self, seq: int) -> bool:
        return any(c[0] == seq for c in self._replies)

    def _sleep(self, until: int) -> None:
        """Wait on the completion semaphore; raise if the loader died without job `until`."""
        _drain(self._sh.finished)
        self._read_done()
        if self._has(until) or self._sh.finished.acquire(timeout=POLL_SECONDS):
            return
        while self._errors.poll():  # a loader blocked sending errors into a full pipe goes on
            self._recv_failure()
        if not self._proc.is_alive():
            self._read_done()  # it may have finished the job just before dying
            if not self._has(until):
                raise self._died()

    def _recv_failure(self) -> None:
        seq, error = self._errors.recv()
        self._failures[seq] = error

    def _read_done(self) -> None:
        sh = self._sh
        head = sh.done_head.value
        if head == self._done_tail:
            return
        with sh.lock:  # the lock orders the loader's result stores before our reads
            for i in range(self._done_tail, head):
                slot = sh.done[i % len(sh.done)]
                seq, error = sh.seq[slot], None
                if sh.state[slot] == FAILED:
                    while seq not in self._failures:  # sent before the completion was published
                        self._recv_failure()
                    error = self._failures.pop(seq)
                self._replies.append((seq, sh.nbytes[slot], sh.seconds[slot], error))
        self._done_tail = head

    def _died(self) -> OffloadError:
        self._proc.join(timeout=1)
        return OffloadError(f"the expert loader process died (exit code {self._proc.exitcode}); restart, or "
                            "set prefetch_worker='thread'")

    def close(self) -> None:
        if self._proc is None:
            return
        self._sh.stop.value = 1
        self._sh.work.release()
        self._proc.join(timeout=10)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()
        self._errors.close()
        self._proc = None


def _drain(sem) -> None:
    """Take every post of `sem`: before sleeping on it, so that only posts made from now on wake us."""
    while sem.acquire(False):
        pass


def _die_with_parent() -> None:
    """Ask Linux to kill this process when the main one dies, however it dies (kill -9 included): it would
    otherwise sleep on its semaphore forever."""
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:  # the main process died before the request took effect
        os._exit(0)


def _serve(sh: _Shared, errors, fill: Fill) -> None:
    """The loader process: claim each job that is still queued, fill its slot, publish the result."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    _die_with_parent()
    import torch

    torch.set_num_threads(1)  # the main process computes; this one only reads and decodes
    tail = 0
    while not sh.stop.value:
        if tail == sh.jobs_head.value:
            _drain(sh.work)  # posts of jobs already taken must not wake us again
            if tail == sh.jobs_head.value:
                sh.work.acquire()  # a wake-up through a pipe would pull this process onto the main one's CPU
            continue
        with sh.lock:
            slot = sh.jobs[tail % len(sh.jobs)]
            tail += 1
            sh.jobs_tail.value = tail
            if sh.state[slot] != QUEUED:
                continue  # stolen by the main process, or a stale entry for a reused slot
            sh.state[slot] = RUNNING
            key = (sh.key[2 * slot], sh.key[2 * slot + 1])
            seq = sh.seq[slot]
        t0 = time.perf_counter()
        n, err = 0, None
        try:
            n = fill(key, slot)
        except BaseException as e:  # surfaces in the main process, with its cause
            err = e
        if err is not None:
            try:
                errors.send((seq, err))
            except (pickle.PicklingError, TypeError, AttributeError):  # an exception that does not pickle
                errors.send((seq, RuntimeError(f"{type(err).__name__}: {err}")))
        with sh.lock:
            sh.nbytes[slot], sh.seconds[slot] = n, time.perf_counter() - t0
            sh.state[slot] = DONE if err is None else FAILED
            head = sh.done_head.value
            sh.done[head % len(sh.done)] = slot
            sh.done_head.value = head + 1
        sh.finished.release()
