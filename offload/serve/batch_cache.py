"""BatchCache: the running sequences' KV caches as one left-padded cache, so one decode step is one forward.

Each sequence is prefilled alone (exactly as `generate` would) and then joins the batch: the shorter side
is left-padded with masked zeros. A finished sequence leaves by row selection, and columns that became
padding for every remaining row are dropped, so the batch never carries more than its longest sequence.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def batchable(cache: DynamicCache) -> bool:
    """Only full-attention layers can be padded and joined; sliding-window or recurrent state cannot."""
    return all(type(layer) is DynamicLayer for layer in cache.layers)


class BatchCache:
    """A DynamicCache of B rows and the [B, L] attention mask saying which of its columns are real."""

    def __init__(self) -> None:
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    def add(self, cache: DynamicCache, device: torch.device) -> None:
        """Append one prefilled sequence (a batch-1 cache without padding) as the last row."""
        length = cache.get_seq_length()
        mask = torch.ones(1, length, dtype=torch.long, device=device)
        if self.cache is None:
            self.cache, self.mask = cache, mask
            return
        width = self.mask.shape[1]
        for mine, theirs in zip(self.cache.layers, cache.layers):
            a_k, a_v, b_k, b_v = _pad(mine.keys, length), _pad(mine.values, length), \
                _pad(theirs.keys, width), _pad(theirs.values, width)
            mine.keys, mine.values = torch.cat([a_k, b_k]), torch.cat([a_v, b_v])
        self.mask = torch.cat([_pad_mask(self.mask, length), _pad_mask(mask, width)])

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows` (in this order); an empty list empties the batch."""
        if not rows:
            self.cache = self.mask = None
            return
        index = torch.tensor(rows, device=self.mask.device)
        mask = self.mask[index]
        drop = int((mask.sum(0) == 0).long().cumprod(0).sum())  # leading columns now padding in every row
        self.mask = mask[:, drop:]
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, drop:].contiguous()
            layer.values = layer.values[index, :, drop:].contiguous()

    def step(self, tokens: torch.Tensor) -> dict:
        """Forward kwargs (all but the cache) for one decode step of `tokens` [B, 1]: one new real column per row."""
        positions = self.mask.sum(-1, keepdim=True)  # each row's real length = the new token's position
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self), 1)], dim=1)
        return {"input_ids": tokens, "attention_mask": self.mask, "position_ids": positions, "use_cache": True}


def _pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """Left-pad the sequence axis of [B, H, L, D] up to `width`."""
    return F.pad(t, (0, 0, width - t.shape[2], 0)) if t.shape[2] < width else t


def _pad_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    return F.pad(mask, (width - mask.shape[1], 0)) if mask.shape[1] < width else mask
