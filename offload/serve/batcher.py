"""Batcher: the engine thread. It alone drives the model; requests reach it through a bounded queue.

Between decode steps it admits waiting sequences (each prefilled alone, so its prompt is processed
exactly as `generate` would), then runs one forward over every running sequence: an expert that several
sequences route to is loaded once for all of them.
"""
from __future__ import annotations

import inspect
import threading
import time
from collections import deque

import torch
from transformers import DynamicCache

from offload.serve.batch_cache import BatchCache, batchable
from offload.serve.metrics import Metrics
from offload.serve.sequence import Sequence


class QueueFull(Exception):
    """More sequences are waiting than --max-queue allows."""


class Batcher:
    def __init__(self, model, metrics: Metrics, max_batch: int = 8, max_queue: int = 64) -> None:
        self.model, self.metrics = model, metrics
        self.max_batch, self.max_queue = max_batch, max_queue
        self._hf = model.model
        self._device = self._hf.device
        # transformers renamed `past_key_values` to `cache`; pass whichever this version takes
        self._cache_kw = "cache" if "cache" in inspect.signature(self._hf.forward).parameters else "past_key_values"
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        self._batch = BatchCache()
        self._wake = threading.Condition()
        self._step = threading.Lock()      # held while the model runs: stats are read between steps
        if not batchable(DynamicCache(config=self._hf.config)):
            self.max_batch = 1  # sliding-window or recurrent layers cannot be padded: decode one at a time
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="offload-engine", daemon=True)

    # --- the request side ------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, seq: Sequence) -> None:
        with self._wake:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting (--max-queue {self.max_queue})")
            self._waiting.append(seq)
            self._wake.notify()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    def model_stats(self) -> dict:
        """`OffloadedModel.stats()` taken between two steps, never while the engine updates it."""
        with self._step:
            return self.model.stats()

    def stop(self) -> None:
        """Refuse new sequences and end every queued or running one with a shutdown error (not blocking)."""
        with self._wake:
            self._stopping = True
            for seq in self._waiting:
                seq.fail("the server is shutting down", status=503)
            self._waiting.clear()
            self._wake.notify()

    def close(self, timeout: float = 10.0) -> None:
        """stop(), then wait for the engine thread to finish its step and exit."""
        self.stop()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # --- the engine thread -----------------------------------------------------------------------
    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not (self._waiting or self._running or self._stopping):
                        self._wake.wait()
                    if self._stopping:
                        for seq in self._running:
                            seq.fail("the server is shutting down", status=503)
                        return
                    admit = []
                    while self._waiting and len(self._running) + len(admit) < self.max_batch:
                        admit.append(self._waiting.popleft())
                for seq in admit:
                    if seq.cancelled.is_set():
                        self.metrics.cancelled()
                    else:
                        self._guarded([seq], self._prefill, seq)
                self._retire()
                if self._running:
                    self._guarded(self._running, self._decode)
                    self._retire()

    def _guarded(self, seqs: list[Sequence], step, *args) -> None:
        """Run a step; if the model raises, fail the sequences it was serving and keep the engine alive."""
        try:
            with self._step:
                step(*args)
        except Exception as e:  # noqa: BLE001 - one bad step must not take the server down
            for seq in list(seqs):
                seq.fail(f"generation failed: {type(e).__name__}: {e}")
            if seqs is self._running:
                self._batch.keep([])
                self._running = []

    def _prefill(self, seq: Sequence) -> None:
        t0 = time.perf_counter()
        cache = DynamicCache(config=self._hf.config)
        ids = torch.tensor([seq.prompt], device=self._device)
        out = self._hf(input_ids=ids, use_cache=True, logits_to_keep=1, **{self._cache_kw: cache})
        seq.push(seq.sample(out.logits[0, -1]))
        self.metrics.prefilled(len(seq.prompt), time.perf_counter() - t0)
        if not seq.done:
            self._batch.add(cache, self._device)
            self._running.append(seq)

    def _decode(self) -> None:
        t0 = time.perf_counter()
        tokens = torch.tensor([[s.last] for s in self._running], device=self._device)
        out = self._hf(**self._batch.step(tokens), logits_to_keep=1, **{self._cache_kw: self._batch.cache})
        for row, seq in enumerate(self._running):
            seq.push(seq.sample(out.logits[row, -1]))
        self.metrics.decoded(len(self._running), time.perf_counter() - t0)

    def _retire(self) -> None:
        """Drop finished and cancelled sequences from the batch."""
        keep = [i for i, s in enumerate(self._running) if not (s.done or s.cancelled.is_set())]
        for s in self._running:
            if s.cancelled.is_set() and not s.done:
                self.metrics.cancelled()
        if len(keep) < len(self._running):
            self._batch.keep(keep)
            self._running = [self._running[i] for i in keep]
