"""LoaderProcess: the prefetcher's CPU loads in a forked process, so they never contend for the GIL.

A Python thread that reads and decodes experts while the main thread computes competes with it for the
GIL at every torch op. Measured on the 2-core CI VM (demo model, ternary store, one expert load + decode
every ~2.5 ms in the background): decode went from 6.35 to 7.81 ms/token with a thread doing the loads,
and stayed at 5.65 with a forked process doing them. The process inherits the store (open descriptors,
mmaps) and writes straight into the slot pool, which lives in shared memory (`SlotPool(shared=True)`).

Jobs are claimed under one shared lock: a job the main thread needs before the process reaches it is
stolen (demand beats prefetch), and a sequence number per slot makes a stale message for a slot that was
reused since harmless. Completions come back over a pipe; the main process reads them when it reaps.
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

QUEUED, RUNNING, STOLEN = range(3)

Fill = Callable[[object, int], int]  # (key, slot) -> bytes read from the store


def fork_available() -> bool:
    """Forking is safe with torch on CPU on Linux (DataLoader workers do it); elsewhere use a thread."""
    return sys.platform.startswith("linux") and "fork" in mp.get_all_start_methods()


class LoaderProcess:
    def __init__(self, fill: Fill, capacity: int) -> None:
        ctx = mp.get_context("fork")
        self._seq = ctx.RawArray("q", capacity)   # per slot: the sequence number of its current job
        self._state = ctx.RawArray("b", capacity)  # per slot: QUEUED / RUNNING / STOLEN
        self._lock = ctx.Lock()
        self._conn, child = ctx.Pipe()
        self._ready = ctx.Semaphore(0)  # one per message sent: the process sleeps on this, not on the pipe
        self._done = ctx.RawValue("q", 0)  # replies sent so far: checking it costs no system call
        self._received = 0
        self._replies: list = []  # read early (see submit), handed out by the next `completions`
        self._next = 0
        args = (child, self._ready, self._done, fill, self._seq, self._state, self._lock)
        self._proc = ctx.Process(target=_serve, args=args, name="moe-offload-loader", daemon=True)
        self._proc.start()
        child.close()

    def submit(self, key, slot: int) -> int:
        """Queue a load of `key` into `slot`; returns the job's sequence number."""
        self._next += 1
        with self._lock:
            self._seq[slot], self._state[slot] = self._next, QUEUED
        try:
            self._read_replies()  # never both blocked writing to each other: we drain before we send
            self._conn.send((self._next, slot, key))
        except (EOFError, OSError):
            raise self._died() from None
        self._ready.release()
        return self._next

    def steal(self, slot: int) -> bool:
        """Take back the job of `slot` if the process has not started it (the caller then loads it)."""
        with self._lock:
            if self._state[slot] == QUEUED:
                self._state[slot] = STOLEN
                return True
        return False

    def completions(self, until: int | None = None) -> list[tuple[int, int, float, BaseException | None]]:
        """(seq, bytes, seconds, error) of finished jobs: those ready now, and with `until`, every one up to
        and including job `until` (blocking until it is done)."""
        try:
            self._read_replies()
            while until is not None and all(c[0] != until for c in self._replies):
                self._recv()
        except (EOFError, OSError):
            raise self._died() from None
        out, self._replies = self._replies, []
        return out

    def _read_replies(self) -> None:
        """Read every reply the process has announced (it counts one before sending it)."""
        while self._done.value > self._received:
            self._recv()

    def _recv(self) -> None:
        self._replies.append(self._conn.recv())
        self._received += 1

    def _died(self) -> OffloadError:
        self._proc.join(timeout=1)
        return OffloadError(f"the expert loader process died (exit code {self._proc.exitcode}); restart, or "
                            "set prefetch_worker='thread'")

    def close(self) -> None:
        if self._proc is None:
            return
        try:
            self._conn.send(None)
            self._ready.release()
        except (OSError, ValueError):
            pass
        self._proc.join(timeout=10)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()
        self._conn.close()
        self._proc = None


def _die_with_parent() -> None:
    """Ask Linux to kill this process when the main one dies, however it dies (kill -9 included): it would
    otherwise sleep on its semaphore forever."""
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:  # the main process died before the request took effect
        os._exit(0)


def _serve(conn, ready, done, fill: Fill, seq, state, lock) -> None:
    """The loader process: claim each job that is still queued, fill its slot, report back."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    _die_with_parent()
    import torch

    torch.set_num_threads(1)  # the main process computes; this one only reads and decodes
    while True:
        ready.acquire()  # a wake-up through a pipe read would pull this process onto the main one's CPU
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        s, slot, key = msg
        with lock:
            if seq[slot] != s or state[slot] != QUEUED:
                continue  # stolen by the main process, or a stale message for a reused slot
            state[slot] = RUNNING
        t0 = time.perf_counter()
        n, err = 0, None
        try:
            n = fill(key, slot)
        except BaseException as e:  # surfaces in the main process, with its cause
            err = e
        reply = (s, n, time.perf_counter() - t0, err)
        done.value += 1  # announced first, so a main process blocked sending us work reads it and unblocks us
        try:
            conn.send(reply)
        except (pickle.PicklingError, TypeError, AttributeError):  # an exception that does not pickle
            conn.send((s, n, reply[2], RuntimeError(f"{type(err).__name__}: {err}")))
