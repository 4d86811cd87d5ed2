"""History baselines (previous step, frequency) and the oracle that reads the future from a recorded trace."""
from __future__ import annotations

import torch
from torch import Tensor

from predictors.base import BasePredictor, column_score, rank_by_count, valid_ids


class PreviousPredictor(BasePredictor):
    """Target layer t gets the experts observed at t on the previous step (most-selected first).

    At layer l of step s, layers l+1..l+d have not been observed yet in step s, so their last observation is
    step s-1's. Ties in count go to the expert in earlier top-k columns. Nothing is predicted for a layer
    before its first observation.
    """

    name = "previous"

    def __init__(self, moe_layers: list[int], num_experts: int, top_k: int, lookahead: int = 1):
        super().__init__(moe_layers, num_experts, top_k, lookahead)
        self._last: dict[int, Tensor] = {}
        self._ranked: dict[int, list[int]] = {}

    def observe(self, layer: int, experts: Tensor) -> None:
        self._last[layer] = torch.as_tensor(experts).detach()
        self._ranked.pop(layer, None)

    def predict(self, layer: int, hidden: Tensor) -> dict[int, list[int]]:
        out = {}
        for t in self.targets(layer):
            ranked = self._ranked.get(t)
            if ranked is None:
                ids = self._last.get(t)
                if ids is None:
                    continue
                ranked = self._ranked[t] = self._rank(ids)  # once per observation, not once per asking layer
            if ranked:
                out[t] = list(ranked)
        return out

    def _rank(self, ids: Tensor) -> list[int]:
        ids = ids.reshape(-1, ids.shape[-1] if ids.dim() else 1)
        E = self.num_experts
        if ids.shape[0] == 1:  # one token (decode): its valid ids in column order, i.e. the router's order
            row = [e for e in ids[0].tolist() if 0 <= e < E]
            if len(set(row)) == len(row):  # (a repeated id would rank first by count: the general path)
                return row
        return rank_by_count(ids, E, column_score(ids, E))

    def reset(self) -> None:
        self._last.clear()
        self._ranked.clear()


class FrequencyPredictor(BasePredictor):
    """Target layer t gets its `width` most used experts so far (counts from observe; ties by lower id).

    Counts are per sequence (reset() clears them) unless `keep_across_sequences=True`.
    """

    name = "frequency"

    def __init__(self, moe_layers: list[int], num_experts: int, top_k: int, lookahead: int = 1,
                 width: int | None = None, keep_across_sequences: bool = False):
        super().__init__(moe_layers, num_experts, top_k, lookahead, width)
        self.keep_across_sequences = keep_across_sequences
        self.counts: dict[int, Tensor] = {}

    def observe(self, layer: int, experts: Tensor) -> None:
        ids = valid_ids(experts.detach(), self.num_experts)
        c = self.counts.get(layer)
        if c is None or c.device != ids.device:
            c = self.counts[layer] = torch.zeros(self.num_experts, dtype=torch.int64, device=ids.device)
        c.scatter_add_(0, ids, torch.ones_like(ids))

    def predict(self, layer: int, hidden: Tensor) -> dict[int, list[int]]:
        targets = [t for t in self.targets(layer) if t in self.counts]
        if not targets:
            return {}
        counts = torch.stack([self.counts[t].cpu() for t in targets])                       # [d, E]
        order = torch.argsort(counts, dim=-1, descending=True, stable=True)[:, : self.width]
        used = counts.gather(-1, order) > 0
        return {t: o[u].tolist() for t, o, u in zip(targets, order, used) if bool(u.any())}

    def reset(self) -> None:
        if not self.keep_across_sequences:
            self.counts.clear()


class OraclePredictor(BasePredictor):
    """Returns the experts the model will really select, read from a recorded trace.

    `trace`: int array (numpy or torch) [steps, len(moe_layers), k]: row s = token s of the sequence, column i =
    the i-th MoE layer in `moe_layers` order; ids outside [0, num_experts) are padding. The oracle keeps its own
    position: a forward pass over T tokens (hidden [T, H]; T = 1 in decode, the prompt length in prefill) is
    answered from rows [pos, pos + T) (most-selected first, ties to earlier top-k columns), and pos advances
    by T when observe() is called for the last MoE layer with experts [T, k]. Targets are the next `lookahead` MoE layers of the same rows (the oracle does not
    wrap to the next token's first layers). Past the end of the trace it predicts nothing. reset() rewinds
    to row 0 (the trace is one sequence); seek(step) moves anywhere.
    """

    name = "oracle"

    def __init__(self, trace, moe_layers: list[int], num_experts: int, top_k: int | None = None,
                 lookahead: int = 1):
        t = torch.as_tensor(trace).long().cpu()
        if t.dim() == 2:
            t = t.unsqueeze(-1)
        if t.dim() != 3 or t.shape[1] != len(set(moe_layers)):
            raise ValueError(f"trace must be [steps, {len(set(moe_layers))} moe layers, k], got {tuple(t.shape)}")
        super().__init__(moe_layers, num_experts, top_k or min(t.shape[2], num_experts), lookahead)
        self.trace = t
        self.column = {layer: i for i, layer in enumerate(self.moe_layers)}
        self.pos = 0
        self._lists: list | None = None  # the trace as nested lists, for one-token answers without torch ops

    def predict(self, layer: int, hidden: Tensor | None) -> dict[int, list[int]]:
        T = 1 if hidden is None or hidden.dim() < 2 else int(hidden.reshape(-1, hidden.shape[-1]).shape[0])
        rows = self.trace[self.pos: self.pos + T]
        if rows.shape[0] == 0:
            return {}
        if T == 1:  # decode: a few microseconds, so that prefetch benchmarks measure prefetch, not the oracle
            if self._lists is None:
                self._lists = self.trace.tolist()
            step, out = self._lists[self.pos], {}
            for t in self.targets(layer):
                row = [e for e in step[self.column[t]] if 0 <= e < self.num_experts]
                if len(set(row)) != len(row):  # a repeated id ranks first by count: the general path
                    out = None
                    break
                if row:  # one token: its ids in column order, which is rank_by_count's order
                    out[t] = row
            if out is not None:
                return out
        out = {}
        for t in self.targets(layer):
            ids = rows[:, self.column[t]]
            ranked = rank_by_count(ids, self.num_experts, column_score(ids, self.num_experts))
            if ranked:
                out[t] = ranked
        return out

    def observe(self, layer: int, experts: Tensor) -> None:
        if layer == self.moe_layers[-1]:
            self.pos += int(experts.shape[0]) if experts.dim() >= 2 else 1

    def seek(self, step: int) -> None:
        self.pos = int(step)

    def reset(self) -> None:
        self.pos = 0
