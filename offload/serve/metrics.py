"""Metrics: the server's counters, rendered in Prometheus text format for GET /metrics.

The engine thread and the request handlers both update it, so every change holds one lock.
"""
from __future__ import annotations

import threading
import time
from collections import Counter, deque

RATE_WINDOW = 10.0  # seconds of generation the tokens/s gauge averages over


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: Counter[tuple[str, int]] = Counter()  # (route, status code) -> responses
        self._cancelled = 0
        self._prompt_tokens = self._generated = self._decode_steps = self._decode_tokens = 0
        self._busy = 0.0
        self._recent: deque[tuple[float, int]] = deque()       # (time, tokens generated) per step

    # --- updates ---------------------------------------------------------------------------------
    def request(self, route: str, code: int) -> None:
        with self._lock:
            self._requests[(route, code)] += 1

    def cancelled(self) -> None:
        with self._lock:
            self._cancelled += 1

    def prefilled(self, prompt_tokens: int, seconds: float) -> None:
        """A prompt went through the model and yielded its first token."""
        with self._lock:
            self._prompt_tokens += prompt_tokens
            self._generated_step(1, seconds)

    def decoded(self, batch: int, seconds: float) -> None:
        """One decode step produced a token for each of `batch` sequences."""
        with self._lock:
            self._decode_steps += 1
            self._decode_tokens += batch
            self._generated_step(batch, seconds)

    def _generated_step(self, tokens: int, seconds: float) -> None:
        now = time.monotonic()
        self._generated += tokens
        self._busy += seconds
        self._recent.append((now, tokens))
        while self._recent and self._recent[0][0] < now - RATE_WINDOW:
            self._recent.popleft()

    # --- rendering -------------------------------------------------------------------------------
    def render(self, stats: dict, waiting: int, running: int) -> str:
        """Prometheus exposition text; `stats` is OffloadedModel.stats() taken between engine steps."""
        with self._lock:
            now = time.monotonic()
            recent = sum(n for t, n in self._recent if t >= now - RATE_WINDOW)
            out = _Exposition()
            out.metric("offload_requests_total", "counter", "HTTP responses by route and status code",
                       [({"route": r, "code": str(c)}, n) for (r, c), n in sorted(self._requests.items())])
            out.metric("offload_requests_cancelled_total", "counter",
                       "generations stopped because the client went away", [({}, self._cancelled)])
            out.metric("offload_prompt_tokens_total", "counter", "prompt tokens prefilled", [({}, self._prompt_tokens)])
            out.metric("offload_generated_tokens_total", "counter", "tokens generated", [({}, self._generated)])
            out.metric("offload_tokens_per_second", "gauge",
                       f"tokens generated per second over the last {RATE_WINDOW:.0f} s", [({}, recent / RATE_WINDOW)])
            out.metric("offload_engine_busy_seconds_total", "counter", "seconds the engine spent in forwards",
                       [({}, self._busy)])
            out.metric("offload_decode_steps_total", "counter", "batched decode forwards", [({}, self._decode_steps)])
            out.metric("offload_decode_tokens_total", "counter",
                       "tokens produced by decode forwards (divide by steps for the mean batch)",
                       [({}, self._decode_tokens)])
        out.metric("offload_queue_depth", "gauge", "requests waiting for a batch slot", [({}, waiting)])
        out.metric("offload_running_sequences", "gauge", "sequences in the decode batch", [({}, running)])
        out.metric("offload_expert_cache_hit_rate", "gauge", "expert cache hits / lookups", [({}, stats["hit_rate"])])
        out.metric("offload_expert_cache_hits_total", "counter", "expert lookups served from the cache",
                   [({}, stats["hits"])])
        out.metric("offload_expert_cache_misses_total", "counter", "expert lookups that loaded from the store",
                   [({}, stats["misses"])])
        out.metric("offload_expert_bytes_loaded_total", "counter", "expert bytes moved into the cache, by source tier",
                   [({"tier": tier}, n) for tier, n in sorted(stats["bytes_loaded"].items())])
        out.metric("offload_resident_experts", "gauge", "experts resident in the cache", [({}, stats["resident_experts"])])
        out.metric("offload_expert_uses_total", "counter",
                   "expert uses by where they were served (device hits + RAM hits + reads == uses)",
                   [({"served": where}, n) for where, n in sorted(stats["tiers"].items()) if where != "cpu_experts"])
        out.metric("offload_cpu_experts_total", "counter", "expert uses computed on the CPU",
                   [({}, stats["tiers"]["cpu_experts"])])
        out.metric("offload_link_bytes_total", "counter", "bytes moved per link",
                   [({"link": link}, v["bytes"]) for link, v in sorted(stats["links"].items())])
        out.metric("offload_link_stall_seconds_total", "counter", "seconds decoding waited on each link",
                   [({"link": link}, v["stall_seconds"]) for link, v in sorted(stats["links"].items())])
        out.metric("offload_ram_tier_experts", "gauge", "records resident in the RAM tier", [({}, stats["ram_experts"])])
        return out.text()


class _Exposition:
    def __init__(self) -> None:
        self._lines: list[str] = []

    def metric(self, name: str, kind: str, help_text: str, samples: list[tuple[dict[str, str], float]]) -> None:
        self._lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        for labels, value in samples:
            tags = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
            self._lines.append(f"{name}{{{tags}}} {_number(value)}" if tags else f"{name} {_number(value)}")

    def text(self) -> str:
        return "\n".join(self._lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:.6g}"
