"""HOBBIT mixed precision on a miss (`low_bit_miss`): a low-bit copy of every expert, held in RAM.

A device miss whose routing weight is below the threshold computes the expert from its low-bit copy at once
(on the CPU, from RAM) instead of waiting for the full record: a low-weight expert adds little to the output,
so its quantization error costs little. An expert that keeps being missed that way is worth its full record:
once it has been served low-bit `repeat` times within the last `window` tokens, its next low-weight miss loads
the full record as any miss does (and it then hits at full precision while it stays resident).

The copy is a second converted store (`offload.store.convert.open_low_bit_store`), read once at load into
records in CPU compute form; serving from it reads no bytes.
Idea: HOBBIT (mixed-precision expert offloading), issue #19.
"""
from __future__ import annotations

from collections import deque

import torch

from cache import Key
from offload.engine.slots import SlotPool
from offload.formats.record import RecordCodec

REPEAT = 2   # low-bit uses within WINDOW tokens after which the next low-weight miss loads the full record
WINDOW = 16  # tokens


class LowBitMiss:
    """The low-bit copies and the rule deciding, per device miss, whether one serves it."""

    def __init__(self, store, codec: RecordCodec, threshold: float, repeat: int = REPEAT,
                 window: int = WINDOW) -> None:
        """`store`: the low-bit store, read whole into RAM now; `codec`: its records' codec on the CPU."""
        self.codec, self.threshold, self.repeat, self.window = codec, threshold, repeat, window
        keys = store.keys()
        self.slots = SlotPool(len(keys), codec.slot_bytes, torch.device("cpu"))
        self._slot = {key: i for i, key in enumerate(keys)}
        self._kind = {key: store.format_of(key) for key in keys}
        buf = torch.empty(store.buffer_bytes, dtype=torch.uint8)
        self.bytes_read = 0  # read once, at load
        for key, i in self._slot.items():
            self.bytes_read += store.read_into(key, buf)
            codec.transform(self._kind[key], buf, self.slots.raw(i))
        self._recent: dict[Key, deque] = {}  # key -> token numbers of its recent low-bit uses
        self.computes = self.served = self.promoted = 0

    def serves(self, key: Key, weight: float, token: int, uses: int) -> bool:
        """Whether the low-bit copy serves this miss of `key` (mean routing weight `weight` over its `uses`
        tokens, at token number `token`); counts it."""
        if weight >= self.threshold:
            return False
        recent = self._recent.setdefault(key, deque())
        while recent and token - recent[0] >= self.window:
            recent.popleft()
        if len(recent) >= self.repeat:
            del self._recent[key]
            self.promoted += 1
            return False
        recent.append(token)
        self.served += 1
        self.computes += uses
        return True

    def views(self, key: Key):
        """(weights, linear) of `key`'s low-bit copy, in CPU compute form."""
        kind = self._kind[key]
        return self.codec.views(self.slots, self._slot[key], kind), self.codec.kind_named(kind).linear

    def stats(self) -> dict:
        return {"computes": self.computes, "loads_avoided": self.served, "promoted": self.promoted,
                "threshold": self.threshold, "resident_bytes": self.slots.nbytes, "bytes_read_at_load": self.bytes_read}

    def reset(self) -> None:
        """Forget recent uses (a cold start)."""
        self._recent = {}

    def reset_stats(self) -> None:
        self.computes = self.served = self.promoted = 0
