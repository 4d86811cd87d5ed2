"""Trace: which experts each token routed to, per MoE layer, with routing weights; saved as .npz.

Dimension letters: T tokens, L MoE layers (in model order), K top-k. An expert id < 0 or
>= num_experts is padding (tokens that routed to fewer experts, or "no expert") and is skipped.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cache.policies import Key

FORMAT = "moe-offload-trace"
VERSION = 1

Step = list[tuple[Key, int, float]]  # (key, uses, summed weight) for each distinct expert of one step


@dataclass
class Trace:
    """Routing of T tokens through L MoE layers; None metadata is inferred from the arrays.

    prompt_boundaries: token index where each prompt starts; prefill_tokens: prompt length of each
    prompt (its first tokens are prefill, the rest decode). step_index: [T] the forward call (engine
    step) each token belonged to, as `offload.engine.tracer.Tracer` records it. The last three only matter for
    `steps(batched=True)`, which groups tokens the way the engine computed them.
    """

    experts: np.ndarray  # [T, L, K] int
    weights: np.ndarray  # [T, L, K] float32
    num_experts: int | None = None  # experts per layer; default max id + 1
    moe_layers: list[int] | None = None  # model layer index of each of the L columns; default range(L)
    top_k: int | None = None  # default K
    model_type: str = ""
    expert_bytes: int | None = None  # bytes moved per expert load, for bytes/token
    prompt_boundaries: list[int] | None = None
    prefill_tokens: list[int] | None = None
    step_index: np.ndarray | None = None  # [T] int, non-decreasing: forward call of each token

    def __post_init__(self) -> None:
        experts = np.asarray(self.experts)
        if experts.ndim == 2:  # [T, K]: a single layer
            experts = experts[:, None, :]
        assert experts.ndim == 3, f"experts must be [tokens, layers, top_k], got shape {experts.shape}"
        assert np.issubdtype(experts.dtype, np.integer), f"expert ids must be integers, got {experts.dtype}"
        weights = np.asarray(self.weights, dtype=np.float32).reshape(experts.shape)
        self.experts, self.weights = experts, weights
        if self.num_experts is None:
            self.num_experts = int(experts.max()) + 1 if experts.size else 0
        if self.moe_layers is None:
            self.moe_layers = list(range(experts.shape[1]))
        self.moe_layers = [int(layer) for layer in self.moe_layers]
        assert len(self.moe_layers) == experts.shape[1], (
            f"{len(self.moe_layers)} moe_layers for {experts.shape[1]} layer columns"
        )
        if self.top_k is None:
            self.top_k = experts.shape[2]
        if self.step_index is not None:
            self.step_index = np.asarray(self.step_index, dtype=np.int64).reshape(-1)
            assert len(self.step_index) == experts.shape[0], (
                f"step_index has {len(self.step_index)} entries for {experts.shape[0]} tokens"
            )
            assert np.all(np.diff(self.step_index) >= 0), "step_index must be non-decreasing (tokens in step order)"

    @property
    def tokens(self) -> int:
        return self.experts.shape[0]

    @property
    def valid(self) -> np.ndarray:
        """[T, L, K] bool: True where the id is a real expert, not padding."""
        return (self.experts >= 0) & (self.experts < self.num_experts)

    def step_spans(self) -> list[tuple[int, int]]:
        """[start, end) token ranges of the forward calls that computed them.

        From `step_index` when recorded; else each prompt's `prefill_tokens` from its boundary form one
        step; else every token is its own step.
        """
        T = self.tokens
        if self.step_index is not None:
            cuts = [0, *(np.flatnonzero(np.diff(self.step_index)) + 1).tolist(), T]
            return [(a, b) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]
        prefill = {}
        if self.prompt_boundaries and self.prefill_tokens:
            prefill = {int(b): int(n) for b, n in zip(self.prompt_boundaries, self.prefill_tokens) if n > 1}
        spans, t = [], 0
        while t < T:
            end = min(T, t + prefill.get(t, 1))
            spans.append((t, end))
            t = end
        return spans

    def steps(self, batched: bool = False) -> Iterator[tuple[int, int, Step]]:
        """(token, layer column, step) in replay order: token-major, then layer, then k.

        Padding is dropped and a repeated id within one step is merged (uses counted, weights summed),
        so each distinct key appears once per step: exactly the accesses `simulate.replay` makes.

        batched=True replays what the engine does: one step per forward call (`step_spans`; a prefill
        of T tokens is one step), its distinct experts in ascending id order, each with its summed
        uses and routing weights; `token` is the step's first token.
        """
        experts, weights, valid = self.experts.tolist(), self.weights.tolist(), self.valid.tolist()
        spans = self.step_spans() if batched else [(t, t + 1) for t in range(self.tokens)]
        for start, end in spans:
            for li, layer in enumerate(self.moe_layers):
                step: dict[Key, list] = {}
                for t in range(start, end):
                    for e, w, ok in zip(experts[t][li], weights[t][li], valid[t][li]):
                        if ok:
                            entry = step.setdefault((layer, e), [0, 0.0])
                            entry[0] += 1
                            entry[1] += w
                items = sorted(step.items()) if batched else step.items()
                yield start, li, [(key, uses, w) for key, (uses, w) in items]

    def keys(self, batched: bool = False) -> list[Key]:
        """The demand access sequence (one entry per distinct expert per step), for Belady."""
        return [key for _, _, step in self.steps(batched) for key, _, _ in step]

    def step_need(self) -> np.ndarray:
        """[L] int: the most distinct experts any one step of each layer needs resident at once."""
        ids = np.sort(np.where(self.valid, self.experts, -1), axis=-1)  # [T, L, K]
        first = np.ones(ids.shape, dtype=bool)
        first[..., 1:] = ids[..., 1:] != ids[..., :-1]
        distinct = (first & (ids >= 0)).sum(axis=-1)  # [T, L]
        return distinct.max(axis=0) if self.tokens else np.zeros(len(self.moe_layers), dtype=np.int64)

    def save(self, path: str | os.PathLike) -> None:
        """Write a compressed .npz atomically (temp file in the same folder, then os.replace)."""
        path = Path(path)
        dtype = np.int16 if self.num_experts <= np.iinfo(np.int16).max else np.int32
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "num_experts": self.num_experts,
            "moe_layers": self.moe_layers,
            "top_k": self.top_k,
            "model_type": self.model_type,
            "expert_bytes": self.expert_bytes,
            "prompt_boundaries": self.prompt_boundaries,
            "prefill_tokens": self.prefill_tokens,
        }
        arrays = {} if self.step_index is None else {"steps": self.step_index.astype(np.int32)}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            if hasattr(os, "fchmod"):
                os.fchmod(fd, 0o644)  # mkstemp makes 0600; a trace is ordinary data
            with os.fdopen(fd, "wb") as f:
                np.savez_compressed(
                    f,
                    experts=self.experts.astype(dtype),
                    weights=self.weights.astype(np.float32),
                    meta=np.array(json.dumps(meta)),
                    **arrays,
                )
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike) -> Trace:
        """Read a trace .npz; files from other tools need only `experts` (and ideally `weights`)."""
        with np.load(path, allow_pickle=False) as data:
            if "experts" not in data:
                raise ValueError(f"{path}: not a routing trace (no 'experts' array; has {sorted(data.files)})")
            experts = data["experts"]
            weights = data["weights"] if "weights" in data else np.zeros(experts.shape, np.float32)
            meta = json.loads(str(data["meta"])) if "meta" in data else {}
            steps = data["steps"].astype(np.int64) if "steps" in data else None
        fields = ("num_experts", "moe_layers", "top_k", "model_type", "expert_bytes",
                  "prompt_boundaries", "prefill_tokens")  # fmt: skip
        return cls(experts.astype(np.int64), weights, step_index=steps,
                   **{k: meta[k] for k in fields if meta.get(k) is not None})
