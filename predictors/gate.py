"""Cross-layer gate predictor (Fate-style): apply the routers of the next MoE layers to this layer's input.

Inside MoE layer l, the experts input `hidden` [T, H] equals the router input of layer l. The residual stream
changes slowly from layer to layer, so the router of layer l+d applied to it is a cheap guess of what layer
l+d will choose. Routing is never re-implemented: each target layer's own router module is called, so
softmax/sigmoid, DeepSeek's group-limited top-k with `e_score_correction_bias`, GPT-OSS's router bias, Phi's
sparsemixer and Llama-4's dense sigmoid scores are all exactly the model's. Two router return shapes exist:

    (router_logits [T,E], top_k_weights [T,k], top_k_index [T,k])   Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3,
                                                                    Phi-MoE, Granite-MoE, GPT-OSS, ...
    (router_scores [T,E] dense, router_logits [T,E])                Llama-4 (`Llama4Router`)

With lookahead 0 the router of layer l runs on the residual stream entering decoder layer l, before its
attention: on the demo model that lifts decode recall@2 from 0.48/0.66/0.80 (layers 1-3, from layer l-1's
MoE input) to 0.86/0.66/0.82, and layer 0, which no earlier layer can predict, gets 0.42. Adding the last
token's attention output at layer l (`attended`) makes it 0.86/0.74/0.91 (see `attended`).

The router's `forward` is called directly (not `router(...)`), so forward hooks on it, such as transformers'
`output_router_logits` recorder or a routing tracer, do not fire for predictions.

Most routers select the top-k of their logits (softmax and sigmoid are monotonic): Mixtral, Qwen, OLMoE,
GPT-OSS, Granite. For those a prediction needs one matmul and one top-k, not the ~7 small ops of the
router's forward (decode, demo model: 78 -> 15 us per call, and a prediction runs at every layer). Which
routers qualify is not assumed from their class: the first route of each layer compares its forward, on
random inputs at three scales, with the top-k of its logits, and takes the short path only when selections
and logits agree exactly. Group-limited or bias-steered routers (DeepSeek-V3) disagree and keep calling
forward; were a rare input to disagree anyway, only a prediction would differ, never the model's output.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from predictors.base import BasePredictor

VARIANT_EMA = 0.1  # weight of one decode step in a layer's score of each lookahead-0 guess

# `<...>.layers.<i>.<moe block attr>.<router attr>` for every architecture in the research table.
_ROUTER_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:mlp|block_sparse_moe|feed_forward)\.(?:gate|router)$")


def find_routers(model: nn.Module) -> dict[int, nn.Module]:
    """{layer index: router module} of a transformers MoE model (dense layers have none).

    Matches `layers.<i>.mlp.gate` (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek), `layers.<i>.mlp.router`
    (GPT-OSS, Phi-MoE), `layers.<i>.block_sparse_moe.router` (Granite) and `layers.<i>.feed_forward.router`
    (Llama-4). Modules with an [E, H] weight only, so a Linear H->1 or a dense MLP is never taken.
    """
    found: dict[int, nn.Module] = {}
    for name, mod in model.named_modules():
        m = _ROUTER_NAME.search(name)
        w = getattr(mod, "weight", None)
        if m is None or not isinstance(w, Tensor) or w.dim() != 2 or w.shape[0] < 2:
            continue
        layer = int(m.group(1))
        if layer in found and found[layer] is not mod:
            raise ValueError(f"two routers for layer {layer} (one is {name}); pass routers explicitly")
        found[layer] = mod
    return dict(sorted(found.items()))


class GatePredictor(BasePredictor):
    """At layer l, run the routers of the next `lookahead` MoE layers on l's router input (lookahead 0: l's
    own router on the residual stream entering layer l).

    Ranked list per target layer: the experts the router selects for the T tokens, most-selected first (ties
    by summed router logits), then, up to `width` ids in all, the next best experts by summed logits. With
    T > 1 the selected set alone can exceed `width`; it is never cut (truncate in the caller if needed).
    """

    name = "gate"

    def __init__(self, routers: dict[int, nn.Module], moe_layers: list[int], num_experts: int, top_k: int,
                 lookahead: int = 1, width: int | None = None):
        super().__init__(moe_layers, num_experts, top_k, lookahead, width)
        extra = sorted(set(routers) - set(self.moe_layers))
        if extra:
            raise ValueError(f"routers given for non-MoE layers {extra}; moe_layers={self.moe_layers}")
        self.routers = dict(routers)
        self._logit_topk: dict[int, tuple | None] = {}  # layer -> (weight, bias, k) when top-k of logits is exact
        # lookahead 0 only: the last token's attention output per layer, this step's top-k guess with and
        # without it, and per layer an EMA of how often each guess was right ([alone, with attention])
        self._attention: dict[int, Tensor] = {}
        self._guesses: dict[int, list[set[int]]] = {}
        self._variant_score: dict[int, list[float]] = {}

    @torch.no_grad()
    def route(self, layer: int, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """`layer`'s router on `hidden` [T, H] (or [..., H]): (top_k_index [T, k] int64, router_logits [T, E])."""
        if layer not in self._logit_topk:
            self._logit_topk[layer] = self._check_logit_topk(layer)
        short = self._logit_topk[layer]
        if short is None:
            return self._forward(layer, hidden)
        weight, bias, k = short
        # in the weight's dtype, as the check compared (DeepSeek-V2 keeps an fp32 router under bf16 since
        # transformers 5.24)
        logits = F.linear(hidden.reshape(-1, hidden.shape[-1]).to(weight.dtype), weight, bias)
        return torch.topk(logits, k, dim=-1).indices, logits

    def logit_topk(self, layer: int) -> bool:
        """Whether `layer`'s router is predicted from the top-k of its logits (decided on its first route)."""
        if layer not in self._logit_topk:
            self._logit_topk[layer] = self._check_logit_topk(layer)
        return self._logit_topk[layer] is not None

    def _check_logit_topk(self, layer: int) -> tuple | None:
        """(weight, bias, k) if the router's forward selects exactly the top-k of F.linear(h, weight, bias) and
        returns those logits, on 96 random inputs at three scales; None otherwise."""
        router = self.routers[layer]
        weight, bias = getattr(router, "weight", None), getattr(router, "bias", None)
        if not isinstance(weight, Tensor) or weight.dim() != 2 or not (bias is None or isinstance(bias, Tensor)):
            return None
        g = torch.Generator().manual_seed(0)
        h = torch.cat([scale * torch.randn(32, weight.shape[1], generator=g) for scale in (0.1, 1.0, 10.0)])
        h = h.to(weight.dtype).to(weight.device)
        index, logits = self._forward(layer, h)
        mine = F.linear(h, weight, bias)
        if logits.shape != mine.shape or not torch.equal(logits, mine):
            return None
        top = torch.topk(mine, index.shape[-1], dim=-1).indices
        return (weight, bias, index.shape[-1]) if torch.equal(top.sort(-1).values, index.sort(-1).values) else None

    def _forward(self, layer: int, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """route() through the router's own forward."""
        router = self.routers[layer]
        h = hidden.reshape(-1, hidden.shape[-1])
        if router.training or not h.is_contiguous():  # Phi's router scales its input in place when training
            h = h.clone(memory_format=torch.contiguous_format)
        out = router.forward(h)
        if not isinstance(out, (tuple, list)):
            raise TypeError(f"router of layer {layer} ({type(router).__name__}) returned {type(out).__name__}, "
                            "expected a tuple")
        if len(out) == 3 and not out[2].is_floating_point():       # (logits, weights, index)
            return out[2].long(), out[0]
        if len(out) == 2 and out[0].shape == out[1].shape:          # Llama-4: (dense scores, logits)
            scores, logits = out
            k = int(getattr(router, "top_k", self.top_k))
            # Selected experts have score sigmoid(logit) > 0, the rest exactly 0. Order by score, ties by
            # logit: a selected score that underflowed to 0 still wins its tie, as it has a top-k logit.
            by_logit = torch.argsort(logits, dim=-1, descending=True, stable=True)
            by_score = torch.argsort(scores.gather(-1, by_logit), dim=-1, descending=True, stable=True)
            return by_logit.gather(-1, by_score)[:, :k], logits
        raise TypeError(f"router of layer {layer} ({type(router).__name__}) returned {len(out)} values of "
                        "unknown meaning; expected (logits, weights, index) or (dense scores, logits)")

    @torch.no_grad()
    def _ranked(self, index: Tensor, logits: Tensor) -> tuple[Tensor, Tensor]:
        """(all E ids ranked, number of selected ids) for one target layer; stays on the device."""
        E = self.num_experts
        counts = torch.zeros(E, dtype=torch.int64, device=index.device)
        counts.scatter_add_(0, index.reshape(-1), torch.ones_like(index.reshape(-1)))
        by_logit = torch.argsort(logits.float().sum(0), descending=True, stable=True)
        order = by_logit[torch.argsort(counts[by_logit], descending=True, stable=True)]
        return order, (counts > 0).sum().reshape(1)

    @torch.no_grad()
    def predict(self, layer: int, hidden: Tensor) -> dict[int, list[int]]:
        targets = [t for t in self.targets(layer) if t in self.routers]
        if not targets or hidden.numel() == 0:
            return {}
        E = self.num_experts
        h = hidden.reshape(-1, hidden.shape[-1])
        if h.shape[0] == 1:
            attention = self._attention.get(layer) if self.lookahead == 0 else None
            if attention is None:
                return {t: rows[0] for t, rows in self._predict_one(targets, h).items()}
            # two guesses, one router call: the stream alone, and with the last token's attention output added
            (rows,) = self._predict_one(targets, torch.cat([h, h + attention.to(h.dtype)])).values()
            self._guesses[layer] = [set(r[: self.top_k]) for r in rows]
            score = self._variant_score.setdefault(layer, [0.5, 0.5])
            return {layer: rows[1] if score[1] >= score[0] else rows[0]}
        parts = [torch.cat(self._ranked(*self.route(t, hidden))) for t in targets]
        rows = torch.stack(parts).tolist()  # one device sync for all targets
        return {t: row[:E][: max(row[E], self.width)] for t, row in zip(targets, rows)}

    def attended(self, layer: int, out: Tensor) -> None:
        """Decoder layer `layer`'s attention output [B, T, H] (what it adds to the stream). Lookahead 0 keeps the
        last token's: added to the next token's entry stream it guesses what attention is about to add. It helps
        deeper layers and hurts layer 0 (whose stream is a bare embedding the attention output swamps), so both
        guesses are made and scored, and each layer answers with the one that has been right more often lately."""
        if self.lookahead == 0 and layer in self.routers:
            self._attention[layer] = out.detach().reshape(-1, out.shape[-1])[-1:]

    def observe(self, layer: int, experts: Tensor) -> None:
        guesses = self._guesses.pop(layer, None)
        if guesses is None or experts.reshape(-1, experts.shape[-1]).shape[0] != 1:
            return
        chosen = set(experts.reshape(-1).tolist())
        score = self._variant_score[layer]
        for i, guess in enumerate(guesses):
            score[i] += VARIANT_EMA * (len(guess & chosen) / max(len(guess), 1) - score[i])

    def reset(self) -> None:
        self._attention.clear()
        self._guesses.clear()  # (the variant scores describe the model, not the sequence: they stay)

    def _predict_one(self, targets: list[int], h: Tensor) -> dict[int, list[list[int]]]:
        """Per target, one ranking per row of h [R, H] (R one-token guesses), with a few tensor ops per target
        instead of a dozen: the same ranking as for many tokens (selected experts by logit, then the rest by
        logit), finished in Python."""
        E, R = self.num_experts, h.shape[0]
        if self.width <= self.top_k:  # the router's selection is the answer, in the router's own order
            # (by routing score, which differs from logit order only where a bias steers selection)
            rows = _rows([self.route(t, h)[0].reshape(-1) for t in targets])
            return {t: [list(dict.fromkeys(e for e in part if 0 <= e < E)) for part in _split(row, R)]
                    for t, row in zip(targets, rows)}
        short = [self._logit_topk[t] if self.logit_topk(t) else None for t in targets]
        if all(short):  # the selection is the top-k logits, so the ranking is the top-`width` logits, in order
            rows = _rows([torch.topk(F.linear(h.to(w.dtype), w, b), self.width, dim=-1).indices.reshape(-1)
                          for w, b, _ in short])
            return {t: _split(row, R) for t, row in zip(targets, rows)}
        parts = []
        for t in targets:
            index, logits = self.route(t, h)
            by_logit = torch.argsort(logits.float(), dim=-1, descending=True, stable=True)
            parts.append(torch.cat([by_logit, index.to(by_logit.dtype)], dim=-1).reshape(-1))
        out = {}
        for t, row in zip(targets, _rows(parts)):
            out[t] = []
            for part in _split(row, R):
                chosen = {e for e in part[E:] if 0 <= e < E}
                ranked = [e for e in part[:E] if e in chosen]
                n = len(ranked)
                ranked += [e for e in part[:E] if e not in chosen]
                out[t].append(ranked[: max(n, self.width)])
        return out


def _split(row: list[int], parts: int) -> list[list[int]]:
    """`row` cut into `parts` equal lists."""
    n = len(row) // parts
    return [row[i * n: (i + 1) * n] for i in range(parts)]


def _rows(parts: list[Tensor]) -> list[list[int]]:
    """Equal-length id tensors as lists, with one device sync for all of them."""
    return torch.stack(parts).tolist() if len(parts) > 1 else [parts[0].tolist()]
