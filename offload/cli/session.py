"""The interactive chat loop behind `offload-chat`: streaming, history, slash commands, Ctrl-C.

Ctrl-C during an answer stops it at the next token and returns to the prompt; a second Ctrl-C (or
Ctrl-C / Ctrl-D at the prompt) exits cleanly.
"""
from __future__ import annotations

import signal
import sys
import time
from dataclasses import dataclass, field

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from transformers import StoppingCriteria, StoppingCriteriaList, TextStreamer

from offload.cli.common import cli_wording
from offload.errors import OffloadError
from offload.model import OffloadedModel

HELP = """/stats  cache hit rate, speed, resident experts, bytes moved, memory plan
/reset  forget the conversation
/help   this help
/exit   leave (Ctrl-D works too)
Ctrl-C stops an answer; a second Ctrl-C exits."""


@dataclass
class Settings:
    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    system: str | None = None


@dataclass
class Chat:
    model: OffloadedModel
    settings: Settings
    console: Console = field(default_factory=Console)
    history: list[dict] = field(default_factory=list)
    last_rate: float | None = None
    _stop: bool = False
    _told_dropping: bool = False  # the dim line about dropped turns is said once

    # --- one answer ------------------------------------------------------------------------------
    def encode(self, messages: list[dict]) -> torch.Tensor:
        tok = self.model.tokenizer
        if getattr(tok, "chat_template", None):
            return tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)["input_ids"]
        # no chat template: plain continuation of the conversation text
        return tok("\n".join(m["content"] for m in messages), return_tensors="pt")["input_ids"]

    def prompt_for(self, text: str) -> torch.Tensor:
        """The conversation plus `text` as input ids. A conversation that outgrew the context loses its oldest
        turns (never the system prompt) until the prompt and a full answer fit, so a long chat goes on."""
        system = [{"role": "system", "content": self.settings.system}] if self.settings.system else []
        limit = self.model.plan.context
        user = {"role": "user", "content": text}
        ids = self.encode(system + self.history + [user])
        dropped = False
        while self.history and ids.shape[1] + self.settings.max_new_tokens > limit:
            del self.history[:2]  # one user turn and its answer
            dropped = True
            ids = self.encode(system + self.history + [user])
        if dropped and not self._told_dropping:
            self.console.print(f"[dim](the conversation outgrew the context of {limit} tokens: its oldest turns "
                               f"are dropped from now on)[/]")
            self._told_dropping = True
        if ids.shape[1] + 1 > limit:
            raise OffloadError(f"this message is {ids.shape[1]} tokens{' with the system prompt' if system else ''}, "
                               f"longer than the context of {limit}; shorten it or raise context=N")
        return ids

    def answer(self, text: str, stream=None) -> str:
        """Generate a reply to `text`, streaming it to `stream` (stdout by default); returns the reply."""
        ids = self.prompt_for(text)
        s = self.settings
        room = self.model.plan.context - ids.shape[1]
        streamer = _Streamer(self.model.tokenizer, stream or sys.stdout)
        self._stop = False
        sample = s.temperature > 0
        kwargs = dict(max_new_tokens=min(s.max_new_tokens, room), do_sample=sample, streamer=streamer,
                      stopping_criteria=StoppingCriteriaList([_Flag(self)]),
                      pad_token_id=self.model.tokenizer.pad_token_id or self.model.tokenizer.eos_token_id)
        if sample:
            kwargs.update(temperature=s.temperature, top_p=s.top_p)
        t0 = time.perf_counter()
        out = self.model.generate(ids, **kwargs)
        dt = time.perf_counter() - t0
        new = out[0, ids.shape[1]:]
        self.last_rate = len(new) / dt if dt > 0 else None
        reply = self.model.tokenizer.decode(new, skip_special_tokens=True).strip()
        self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]
        return reply

    # --- the loop --------------------------------------------------------------------------------
    def repl(self) -> None:
        self.console.print("[bold]offload-chat[/] - /help for commands, Ctrl-D to leave")
        previous = signal.getsignal(signal.SIGINT)
        while True:
            try:
                text = input("\n> ")
            except (EOFError, KeyboardInterrupt):
                self.console.print()
                return
            text = text.strip()
            if not text:
                continue
            if text.startswith("/"):
                if self.command(text):
                    return
                continue
            signal.signal(signal.SIGINT, self._on_sigint)
            try:
                self.answer(text)
                if self._stop:
                    self.console.print("\n[dim](stopped)[/]")
            except OffloadError as e:
                self.console.print(f"[red]error:[/] {escape(cli_wording(str(e)))}")
            except KeyboardInterrupt:
                self.console.print()
                return
            finally:
                signal.signal(signal.SIGINT, previous)
            print()

    def command(self, text: str) -> bool:
        """Run a slash command; True means leave."""
        cmd = text.split()[0].lower()
        if cmd in ("/exit", "/quit"):
            return True
        if cmd == "/reset":
            self.history.clear()
            self.console.print("[dim]conversation cleared[/]")
        elif cmd == "/stats":
            self.console.print(stats_table(self.model, self.last_rate))
        elif cmd == "/help":
            self.console.print(HELP)
        else:
            self.console.print(f"unknown command {cmd}; /help lists them")
        return False

    def _on_sigint(self, signum, frame) -> None:
        if self._stop:  # second Ctrl-C: leave
            raise KeyboardInterrupt
        self._stop = True


class _Flag(StoppingCriteria):
    """Stops generation at the next token once Ctrl-C was pressed."""

    def __init__(self, chat: Chat) -> None:
        self.chat = chat

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.chat._stop, dtype=torch.bool)


class _Streamer(TextStreamer):
    def __init__(self, tokenizer, stream) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.stream = stream

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.stream.write(text)
        self.stream.flush()


def stats_table(model: OffloadedModel, rate: float | None = None) -> Table:
    s = model.stats()
    mib = lambda n: f"{n / 2**20:.1f} MiB"  # noqa: E731
    t = Table(title="moe-offload stats", show_header=False)
    t.add_row("hit rate", f"{100 * s['hit_rate']:.1f}% ({s['hits']} hits, {s['misses']} misses, "
                          f"{s['evictions']} evictions)")
    t.add_row("tokens/s (last answer)", f"{rate:.1f}" if rate else "-")
    t.add_row("resident experts", f"{s['resident_experts']} of {s['total_experts']} "
                                  f"({mib(s['resident_bytes'])} of {mib(s['capacity_bytes'])} slots)")
    moved = ", ".join(f"{tier} {mib(n)}" for tier, n in s["bytes_loaded"].items()) or "nothing yet"
    t.add_row("bytes moved", moved)
    t.add_row("stall", f"{1000 * s['stall_seconds']:.0f} ms over {s['tokens']} tokens")
    tiers = s["tiers"]
    t.add_row("served from", ", ".join(f"{n.replace('_', ' ')} {v}" for n, v in tiers.items()))
    t.add_row("links", ", ".join(f"{name} {mib(v['bytes'])} in {v['loads']} loads, stall {1000 * v['stall_seconds']:.0f} ms"
                                 for name, v in s["links"].items()))
    if s["prefetch_issued"]:
        t.add_row("prefetch", f"{s['prefetch_useful']} useful of {s['prefetch_issued']} issued")
    for name, value in model.plan.rows():
        t.add_row(f"plan: {name}", value)
    return t
