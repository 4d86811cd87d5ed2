"""Sequence: one request's generation - how it samples, the text it has produced, and when it stops.

The engine thread owns every Sequence; the request handler only sees the Events it emits and may set
`cancelled` (the client went away).
"""
from __future__ import annotations

import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0   # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None    # None: a fresh random seed per request
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False   # vLLM's extension: decode max_tokens whatever the model says (benchmarks)


@dataclass(frozen=True)
class Event:
    """New text since the previous event; the last one carries finish_reason (or error)."""

    text: str
    completion_tokens: int
    finish_reason: str | None = None   # "stop" (EOS or a stop string) or "length"
    error: str | None = None
    status: int = 200                  # with an error: the HTTP status it stands for
    token_ids: tuple[int, ...] = ()    # on the last event: every generated token


class Sequence:
    def __init__(self, prompt: list[int], params: SamplingParams, tokenizer, eos: frozenset[int],
                 emit: Callable[[Event], None]) -> None:
        self.prompt, self.params, self.emit = prompt, params, emit
        self.tokens: list[int] = []          # every generated token, EOS included (OpenAI counts it)
        self.done = False
        self.cancelled = threading.Event()
        self._tokenizer, self._eos = tokenizer, eos
        self._text_ids: list[int] = []       # generated tokens that make text (EOS excluded)
        self._sent = 0                       # characters of the text already emitted
        self._longest_stop = max((len(s) for s in params.stop), default=0)
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        self._generator = torch.Generator().manual_seed(seed)  # per request: batching never changes a sample

    @property
    def last(self) -> int:
        return self.tokens[-1]

    def sample(self, logits: torch.Tensor) -> int:
        """The next token from this position's logits [V]."""
        p = self.params
        if p.temperature == 0:
            return int(logits.argmax())
        probs = torch.softmax(logits.float().cpu() / p.temperature, dim=-1)
        if p.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            keep = sorted_p.cumsum(0) - sorted_p < p.top_p  # the smallest prefix reaching top_p
            keep[0] = True                                   # top_p=0 still samples the likeliest token
            probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
        return int(torch.multinomial(probs, 1, generator=self._generator))

    def push(self, token: int) -> None:
        """Record a generated token, emit the text it completes, and decide whether the sequence is done."""
        self.tokens.append(token)
        finish = None
        if token in self._eos:
            finish = "stop"
        else:
            self._text_ids.append(token)
        text = self._tokenizer.decode(self._text_ids, skip_special_tokens=True)
        cut = self._stop_at(text)
        if cut is not None:
            text, finish = text[:cut], "stop"
        elif finish is None and len(self.tokens) >= self.params.max_tokens:
            finish = "length"
        end = len(text) if finish else max(self._sent, self._safe_end(text))
        delta, self._sent = text[self._sent:end], end
        self.done = finish is not None
        if delta or finish:
            self.emit(Event(delta, len(self.tokens), finish, token_ids=tuple(self.tokens) if finish else ()))

    def fail(self, message: str, status: int = 500) -> None:
        self.done = True
        self.emit(Event("", len(self.tokens), error=message, status=status))

    def _stop_at(self, text: str) -> int | None:
        """Where the first stop string starts, searching only text that could hold a new one."""
        start = max(0, self._sent - self._longest_stop)
        hits = [i for i in (text.find(s, start) for s in self.params.stop) if i >= 0]
        return min(hits) if hits else None

    def _safe_end(self, text: str) -> int:
        """How much text may go out: not a half-decoded character, nor what could begin a stop string."""
        end = len(text.rstrip("\ufffd"))
        hold = max((k for s in self.params.stop for k in range(1, len(s))
                    if text[:end].endswith(s[:k])), default=0)
        return end - hold
