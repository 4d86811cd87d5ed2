"""Prefetch workers: who runs the background loads, behind one interface the prefetcher uses unchanged.

    submit(job) -> bool          queue a load (False: no room, nothing was queued)
    take_back(job) -> bool       withdraw a job the worker has not started (then the caller loads it, or nobody)
    completions(until) -> jobs   finished jobs (with bytes, seconds, error, CUDA event); with `until`, block until
                                 that job is among them
    start() / stop() / close()   start now (keeps a fork out of a timing) / let every load land and stop / stop

ThreadWorker runs loads on one thread: CUDA copies (the load function stages into pinned memory and copies on
a stream) and CPU where fork is unavailable; store reads and copies release the GIL. ProcessWorker runs them
in a forked loader process writing into shared slots (`offload.engine.loader`): on CPU a thread would fight the
main thread for the GIL at every torch op.
"""
from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable

from cache import Key

QUEUED, RUNNING, DONE, STOLEN = range(4)
_STOP = object()

Load = Callable[[Key, int], tuple[object, int]]  # (key, slot) -> (CUDA event or None, bytes read from the store)


class Job:
    __slots__ = ("done", "error", "event", "key", "lock", "nbytes", "seconds", "seq", "slot", "state")

    def __init__(self, key: Key, slot: int) -> None:
        self.key, self.slot, self.state = key, slot, QUEUED
        self.lock, self.done = threading.Lock(), threading.Event()  # the thread worker's handshake
        self.error: BaseException | None = None
        self.event = None  # CUDA event recorded after the copy
        self.nbytes, self.seconds = 0, 0.0
        self.seq = 0  # the loader process's job number


class ThreadWorker:
    def __init__(self, load: Load) -> None:
        self._load = load
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._finished: deque[Job] = deque()
        self.runner: threading.Thread | None = None

    def start(self) -> None:
        if self.runner is None:
            self.runner = threading.Thread(target=self._run, name="moe-offload-prefetch", daemon=True)
            self.runner.start()

    def submit(self, job: Job) -> bool:
        self.start()
        self._queue.put(job)
        return True

    def take_back(self, job: Job) -> bool:
        with job.lock:
            taken = job.state == QUEUED
            if taken:
                job.state = STOLEN
        return taken

    def completions(self, until: Job | None = None) -> list[Job]:
        if until is not None:
            until.done.wait()
        out = []
        while self._finished:
            out.append(self._finished.popleft())
        return out

    def stop(self) -> None:
        pass  # an idle thread costs nothing

    def close(self) -> None:
        if self.runner is not None:
            self._queue.put(_STOP)
            self.runner.join(timeout=10)
            self.runner = None

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is _STOP:
                return
            with job.lock:
                if job.state != QUEUED:
                    continue
                job.state = RUNNING
            t0 = time.perf_counter()
            try:
                job.event, job.nbytes = self._load(job.key, job.slot)
            except BaseException as e:  # surfaces in the main thread, with its cause
                job.error = e
            job.seconds = time.perf_counter() - t0
            job.state = DONE
            self._finished.append(job)
            job.done.set()


class ProcessWorker:
    def __init__(self, fill: Callable[[Key, int], int], capacity: int) -> None:
        self._fill, self._capacity = fill, capacity
        self.loader = None  # LoaderProcess, started with the first job
        self._by_seq: dict[int, Job] = {}

    def start(self) -> None:
        if self.loader is None:
            from offload.engine.loader import LoaderProcess

            self.loader = LoaderProcess(self._fill, self._capacity)

    def submit(self, job: Job) -> bool:
        self.start()
        job.seq = self.loader.submit(job.key, job.slot)  # raises OffloadError if the loader died
        if not job.seq:  # its job ring is full
            return False
        self._by_seq[job.seq] = job
        return True

    def take_back(self, job: Job) -> bool:
        taken = self.loader.steal(job.slot)
        if taken:  # no completion will come for it
            del self._by_seq[job.seq]
        return taken

    def completions(self, until: Job | None = None) -> list[Job]:
        if self.loader is None:
            return []
        jobs = []
        for seq, n, seconds, error in self.loader.completions(None if until is None else until.seq):
            job = self._by_seq.pop(seq)
            job.nbytes, job.seconds, job.error = n, seconds, error
            jobs.append(job)
        return jobs

    def pending(self) -> int:
        return len(self._by_seq)

    def stop(self) -> None:
        """The caller has let every load land: a process holding several models runs one loader at a time."""
        self.close()

    def close(self) -> None:
        if self.loader is not None:
            self.loader.close()
            self.loader = None
