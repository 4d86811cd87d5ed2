"""Tracer: records routing during generation (per token and MoE layer: experts and weights).

The result is a `cache.Trace`, saved as a compact .npz that the simulator and `offload-bench` replay.
"""
from __future__ import annotations

import numpy as np
import torch

from cache import Trace


class Tracer:
    def __init__(self, moe_layers: list[int], num_experts: int, top_k: int, model_type: str = "",
                 expert_bytes: int | None = None) -> None:
        self.moe_layers, self.num_experts, self.top_k = moe_layers, num_experts, top_k
        self.model_type, self.expert_bytes = model_type, expert_bytes
        self._column = {layer: i for i, layer in enumerate(moe_layers)}
        self._steps: list[tuple[np.ndarray, np.ndarray]] = []  # per forward: experts/weights [T, L, K]
        self._prompts: list[int] = []
        self._prefill: list[int] = []  # length of the forward that opened each prompt

    def record(self, layer: int, top_k_index: torch.Tensor, top_k_weights: torch.Tensor | None) -> None:
        col = self._column[layer]
        idx = top_k_index.detach().to("cpu", torch.int16).numpy()
        w = (top_k_weights.detach().float().cpu().numpy() if top_k_weights is not None
             else np.zeros(idx.shape, np.float32))
        if col == 0:
            T = idx.shape[0]
            if T > 1 or not self._steps:
                self._prompts.append(sum(s[0].shape[0] for s in self._steps))
                self._prefill.append(T)
            self._steps.append((np.full((T, len(self.moe_layers), self.top_k), -1, np.int16),
                                np.zeros((T, len(self.moe_layers), self.top_k), np.float32)))
        experts, weights = self._steps[-1]
        experts[:, col, : idx.shape[1]] = idx
        weights[:, col, : w.shape[1]] = w

    def trace(self) -> Trace:
        if not self._steps:
            experts = np.zeros((0, len(self.moe_layers), self.top_k), np.int16)
            weights = np.zeros(experts.shape, np.float32)
            steps = np.zeros(0, np.int64)
        else:
            experts = np.concatenate([s[0] for s in self._steps])
            weights = np.concatenate([s[1] for s in self._steps])
            steps = np.concatenate([np.full(s[0].shape[0], i, np.int64) for i, s in enumerate(self._steps)])
        return Trace(experts, weights, num_experts=self.num_experts, moe_layers=self.moe_layers, top_k=self.top_k,
                     model_type=self.model_type, expert_bytes=self.expert_bytes,
                     prompt_boundaries=list(self._prompts), prefill_tokens=list(self._prefill),
                     step_index=steps)

    def reset(self) -> None:
        self._steps.clear()
        self._prompts.clear()
        self._prefill.clear()
