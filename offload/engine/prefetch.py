"""Prefetcher: the only place that moves expert bytes between tiers.

`submit(keys)` starts loads in the background (skipping resident or in-flight keys); `fetch(key)` returns
a ready slot, demand-loading on a miss. Background loads run on a worker (`offload.engine.workers`: a
forked loader process on CPU, a thread on CUDA and where fork is unavailable) behind one interface. A demand
for a key still queued behind other prefetches is taken back and loaded at once: demand always beats
prefetch. On CUDA the worker stages records in pinned host buffers and copies them on a dedicated stream;
compute waits only on the event of the expert it needs, and a copy into a slot waits only on the event
recorded after the compute that last read the slot (the CPU runs ahead of the GPU: an evicted expert's
kernels may not have run yet). In-flight keys stay pinned in the cache until the main thread reaps them,
so a slot is never handed out twice.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

import torch

from cache import CacheFull, ExpertCache, Key
from offload.engine.slots import SlotPool
from offload.engine.stats import EngineStats
from offload.engine.workers import Job, ProcessWorker, ThreadWorker
from offload.errors import OffloadError
from offload.store.disk import aligned_buffer


class Prefetcher:
    def __init__(self, store, cache: ExpertCache, slots: SlotPool, stats: EngineStats,
                 transform: Callable[[Key, torch.Tensor, torch.Tensor], None] | None = None,
                 staging_buffers: int = 4, worker: str = "thread", hold: Callable[[Key], None] | None = None,
                 release: Callable[[Key, object], None] | None = None) -> None:
        """`transform(key, record, slot)` turns a stored record into its resident form (None: a plain copy).
        `worker`: "thread", or "process" (CPU only; `slots` must be shared, see SlotPool). `hold(key)` runs when
        a prefetch of `key` is queued and `release(key, CUDA event or None)` when it is done or dropped: a RAM
        tier pins the record being read out of it for that long."""
        self.store, self.cache, self.slots, self.stats, self.transform = store, cache, slots, stats, transform
        self._hold, self._release_source = hold, release
        self.cuda = slots.device.type == "cuda"
        self._jobs: dict[Key, Job] = {}
        self._prefetched: set[Key] = set()  # prefetched and not used yet
        if worker not in ("thread", "process"):
            raise ValueError(f"worker must be 'thread' or 'process', got {worker!r}")
        if worker == "process" and (self.cuda or not slots.shared):
            raise ValueError("a loader process needs CPU slots in shared memory (SlotPool(shared=True))")
        self.worker = ProcessWorker(self._fill, cache.capacity) if worker == "process" else ThreadWorker(self._load)
        if self.cuda:
            nbytes = store.buffer_bytes
            self._copy_stream = torch.cuda.Stream(device=slots.device)
            self._staging = [self._pinned(nbytes) for _ in range(staging_buffers + 1)]
            self._staging_events: list = [None] * len(self._staging)
            self._next_staging = 0
            self._staging_lock = threading.Lock()
            # Per slot, recorded on the compute stream after each use: kernels queued on an expert may still
            # be reading its slot when the CPU evicts it, so a copy into the slot first waits for this.
            self._slot_free = [torch.cuda.Event() for _ in range(slots.capacity)]
        else:
            self._scratch = {}  # per thread: a record buffer for stores whose records need a transform

    # --- the main thread's API --------------------------------------------------------------------
    def fetch(self, key: Key, uses: int = 1, weight: float = 0.0) -> int:
        """Slot index holding `key`, ready to compute with; counts one hit or one miss for its first use."""
        self._reap()
        job = self._jobs.get(key)
        try:
            slot, hit = self.cache.access(key, uses, weight)
        except CacheFull:  # every slot is held by loads in flight: let them land, then there is room
            self.drain()
            slot, hit = self.cache.access(key, uses, weight)
        if key in self._prefetched:  # a hit on it is a useful prefetch; a miss means it was evicted unused
            self._prefetched.discard(key)
            self.stats.prefetch_useful += hit
        if job is not None:
            self._finish(job)
        elif not hit:
            t0 = time.perf_counter()
            try:
                self._demand(key, slot)
            except BaseException:
                self.cache.remove(key)
                raise
            self.stats.stall_seconds += time.perf_counter() - t0
        return slot

    def used(self, slot: int) -> None:
        """The compute for `slot`'s expert is queued (CUDA): a later load into the slot waits for it to run."""
        if self.cuda:
            self._slot_free[slot].record(torch.cuda.current_stream(self.slots.device))

    def submit(self, keys: Iterable[Key], protect: Callable[[Key], bool] | None = None) -> None:
        """Start loading `keys` in the background; a key that cannot get a slot without evicting a key
        `protect` accepts is dropped (costs nothing)."""
        self._reap()
        for key in keys:
            if key in self.cache or key in self._jobs:
                continue
            slot = self.cache.insert_prefetch(key, protect=protect)
            if slot is None:
                self.stats.prefetch_dropped += 1
                continue
            self.cache.pin(key)
            job = self._jobs[key] = Job(key, slot)
            if self._hold is not None:
                self._hold(key)
            self._prefetched.add(key)
            try:
                queued = self.worker.submit(job)
            except OffloadError:  # the loader died: undo this job, then say so
                self._undo(job)
                raise
            if not queued:  # no room in the worker's queue: drop this prefetch
                self._undo(job)
                continue
            self.stats.prefetch_issued += 1

    def cancel(self, key: Key) -> bool:
        """Withdraw the prefetch of `key` if the worker has not started it (the router just chose otherwise):
        its read would only delay the demand loads of this layer on the same disk. True if withdrawn."""
        job = self._jobs.get(key)
        if job is None or not self.worker.take_back(job):
            return False
        self._forget(job)
        self.stats.prefetch_cancelled += 1
        return True

    def drain(self) -> None:
        """Wait for every in-flight prefetch (used before reading stats or shutting down)."""
        for job in list(self._jobs.values()):
            self._finish(job)

    def start_loader(self) -> None:
        """Start the worker now rather than at the first prefetch (a benchmark keeps a fork out of its timings)."""
        self.worker.start()

    def stop_loader(self) -> None:
        """Let every load land and stop a loader process; the next prefetch starts a fresh one. A process
        holding several models runs one loader at a time this way (idle loaders of other models slow a
        model's demand reads; docs/benchmarks/prefetch.md)."""
        self.drain()
        self.worker.stop()

    def in_flight(self) -> int:
        return len(self._jobs)

    def pending_unused(self) -> int:
        """Prefetched keys still resident (or in flight) and not used yet."""
        return sum(1 for k in self._prefetched if k in self.cache)

    def close(self) -> None:
        self.worker.close()
        for job in list(self._jobs.values()):  # never started, or finished unreaped: release their pins
            self._release(job, raise_error=False)

    # --- internals --------------------------------------------------------------------------------
    def _finish(self, job: Job) -> None:
        """The main thread needs `job` now: load it here if the worker has not started it, else wait for it."""
        if self._jobs.get(job.key) is not job:  # released already (drain walks a snapshot)
            return
        t0 = time.perf_counter()
        if self.worker.take_back(job):
            try:
                self._demand(job.key, job.slot)
            except BaseException as e:
                job.error = e
            self._release(job)
        else:
            self._reap(until=job)
        self.stats.stall_seconds += time.perf_counter() - t0

    def _demand(self, key: Key, slot: int) -> None:
        """Load `key` into `slot` on the main thread, counted, and make compute wait for it."""
        t0 = time.perf_counter()
        event, n = self._load(key, slot)
        self._count(n, time.perf_counter() - t0)
        self._wait_event(event)

    def loading(self, key: Key) -> bool:
        """Whether a load of `key` is queued or running."""
        return key in self._jobs

    def _forget(self, job: Job) -> None:
        """Drop a job that will never be read, and its slot."""
        del self._jobs[job.key]
        if self._release_source is not None:
            self._release_source(job.key, None)
        self._prefetched.discard(job.key)
        self.cache.unpin(job.key)
        self.cache.remove(job.key)

    def _undo(self, job: Job) -> None:
        """Forget a job the worker never got (counted as dropped, not issued)."""
        self._forget(job)
        self.stats.prefetch_dropped += 1

    def _release(self, job: Job, raise_error: bool = True) -> None:
        if self._jobs.get(job.key) is job:
            del self._jobs[job.key]
            self.cache.unpin(job.key)
            if self._release_source is not None:
                self._release_source(job.key, job.event)
        if job.error is not None:
            self.cache.remove(job.key) if job.key in self.cache else None
            self._prefetched.discard(job.key)
            err, job.error = job.error, None
            if not raise_error:
                return
            if isinstance(err, OffloadError):
                raise err
            raise RuntimeError(f"loading expert {job.key} failed in the prefetch worker: {err}") from err

    def _reap(self, until: Job | None = None) -> None:
        """Release every job the worker has finished (with `until`, once that one is among them)."""
        jobs = self.worker.completions(until)
        failed = None
        for job in jobs:  # release every one before raising the first error
            if job.error is None:
                self._count(job.nbytes, job.seconds)
            self._wait_event(job.event)
            try:
                self._release(job)
            except BaseException as e:
                failed = failed or e
        if failed is not None:
            raise failed

    def _wait_event(self, event) -> None:
        """Make the compute stream wait for one copy (CUDA); nothing to do on CPU."""
        if event is not None:
            torch.cuda.current_stream(self.slots.device).wait_event(event)

    def _load(self, key: Key, slot: int):
        """(CUDA event or None, bytes read from the store) of reading `key` into `slot`."""
        if self.cuda:
            return self._load_cuda(key, slot)
        return None, self._fill(key, slot)

    def _fill(self, key: Key, slot: int) -> int:
        """CPU: the record of `key` into `slot`, in its resident form; returns the bytes read from the store."""
        if self.transform is None:
            return self.store.read_into(key, self.slots.raw(slot))
        record = self._thread_scratch()
        n = self.store.read_into(key, record)
        self.transform(key, record, self.slots.raw(slot))
        return n

    def _count(self, nbytes: int, seconds: float) -> None:
        self.stats.bytes_loaded[self.store.tier] += nbytes
        self.stats.loads += 1
        self.stats.load_seconds += seconds

    def _thread_scratch(self) -> torch.Tensor:
        tid = threading.get_ident()
        buf = self._scratch.get(tid)
        if buf is None:
            buf = self._scratch[tid] = aligned_buffer(self.store.buffer_bytes)
        return buf

    def _pinned(self, nbytes: int) -> torch.Tensor:
        try:
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        except RuntimeError:  # pinning refused: pageable staging still works, without overlap
            return torch.empty(nbytes, dtype=torch.uint8)

    def _load_cuda(self, key: Key, slot: int) -> tuple[torch.cuda.Event, int]:
        i = None
        if hasattr(self.store, "record"):  # a pinned RAM tier: copy straight out of its record
            staging = self.store.record(key)
            n = staging.numel()
        else:
            with self._staging_lock:
                i = self._next_staging
                self._next_staging = (i + 1) % len(self._staging)
                if self._staging_events[i] is not None:
                    self._staging_events[i].synchronize()  # the previous copy out of this buffer is done
            staging = self._staging[i]
            n = self.store.read_into(key, staging)
        with torch.cuda.stream(self._copy_stream):
            self._copy_stream.wait_event(self._slot_free[slot])  # the slot's previous expert is computed
            dst = self.slots.raw(slot)
            if self.transform is None:
                dst.copy_(staging, non_blocking=True)
            else:
                self.transform(key, staging, dst)
            event = torch.cuda.Event()
            event.record(self._copy_stream)
        if i is not None:
            self._staging_events[i] = event
        return event, n
