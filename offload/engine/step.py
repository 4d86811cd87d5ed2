"""Engine: one MoE layer's step, top to bottom.

route (already done by transformers) -> predict the next layers' experts and submit prefetches ->
fetch this layer's experts (demand-load on a miss; this layer's keys are pinned) -> expert FFN from slot
views -> weighted combine with eager numerics (per-expert matmul, index_add_ in the model dtype).
A decode step (one token) takes `_run_token`, the same ops without the general path's index bookkeeping.

Legend: T tokens, H hidden size, k experts per token (top-k), E routed experts per layer.
"""
from __future__ import annotations

import torch
from torch import nn

from cache import ExpertCache
from offload.engine.experts import expert_ffn
from offload.engine.prefetch import Prefetcher
from offload.engine.slots import SlotPool
from offload.engine.stats import EngineStats


PRECISION_EMA = 0.05  # weight of one layer's score in the prefetch-precision average, times the MoE layers
PAUSED_EVERY = 4      # while prefetch is paused, predictions (only scored) run on one token in this many


class Engine:
    def __init__(self, store, cache: ExpertCache, slots: SlotPool, num_experts: int, top_k: int,
                 moe_layers: list[int], predictor=None, prefetch_width: int | None = None,
                 codec=None, tracer=None, min_precision: float = 0.75, worker: str = "thread") -> None:
        self.store, self.cache, self.slots = store, cache, slots
        self.num_experts, self.top_k, self.moe_layers = num_experts, top_k, moe_layers
        self.stats = EngineStats()
        transform = None if codec is None else (lambda key, rec, slot: codec.transform(store.format_of(key), rec, slot))
        self.prefetcher = Prefetcher(store, cache, slots, self.stats, transform=transform, worker=worker)
        self.predictor, self.tracer = predictor, tracer
        self.entry = bool(getattr(predictor, "entry", False))  # predicts at layer entries (lookahead 0)
        self.prefetch_width = prefetch_width or top_k
        self.codec = codec  # quantized records (None: dense weights in the slot)
        self.min_precision = min_precision
        self._precision: dict[int, float] = {}  # target layer -> EMA of prefetch precision (absent: 1.0)
        # A layer is scored once per token, so its average moves PRECISION_EMA x the MoE layers per score:
        # it forgets as fast per token as one shared average did.
        self._precision_rate = min(1.0, PRECISION_EMA * len(moe_layers))
        self._targets = getattr(predictor, "targets", None)  # target layers of a prediction at a layer
        self._attended = getattr(predictor, "attended", None) if self.entry else None
        self._predicted: dict[int, list[int]] = {}  # target layer -> experts predicted for it this step
        # A prefetch may only displace experts not used during the last pass over the layers (one decode
        # token). A guess is right ~60-80% of the time, and a recently used expert is reused often enough
        # that evicting it for a guess moves more bytes than it saves; where every slot holds a recent
        # expert (capacity ~ one token's experts) prefetching stops by itself. See `_protected` and
        # docs/benchmarks/prefetch.md.
        self._step = 0                        # MoE layer calls so far
        self._last_use: dict = {}             # key -> the step it was last used in
        self.active = None                    # ActiveExperts (LExI): trims each layer's top-k; None: the model's

    # --- one layer -------------------------------------------------------------------------------
    def run_layer(self, module: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor | None,
                  top_k_weights: torch.Tensor | None) -> torch.Tensor:
        if torch.is_grad_enabled():  # a plain forward outside inference mode: experts are never trained
            with torch.no_grad():
                return self.run_layer(module, hidden, top_k_index, top_k_weights)
        if self.active is not None:
            top_k_index, top_k_weights = self.active.trim(module.layer_idx, top_k_index, top_k_weights)
        if top_k_index is None:  # Llama-4 hands every token to every expert, pre-scaled by its score
            return self._run_replicated(module, hidden)
        if hidden.shape[0] == 1:
            out = self._run_token(module, hidden, top_k_index, top_k_weights)
            if out is not None:
                return out
        layer = module.layer_idx
        E = self.num_experts
        self._count_tokens(layer, hidden.shape[0])
        final = torch.zeros_like(hidden)
        mask = torch.nn.functional.one_hot(top_k_index, num_classes=E + 1).permute(2, 1, 0)  # [E+1, k, T]
        uses = mask.sum(dim=(-1, -2))                                                     # [E+1]
        experts = [e for e in torch.greater(uses, 0).nonzero()[:, 0].tolist() if e < E]    # ascending, as eager

        def select(i: int, e: int):
            top_k_pos, token_idx = torch.where(mask[e])
            return int(uses[e]), float(top_k_weights[token_idx, top_k_pos].float().sum()), (top_k_pos, token_idx)

        observe = lambda: self._observe(layer, hidden, top_k_index, top_k_weights)  # noqa: E731
        for w, linear, (top_k_pos, token_idx) in self._each_expert(layer, experts, select, observe):
            y = expert_ffn(module, w, hidden[token_idx], linear)
            y = y * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, y.to(final.dtype))
        return final

    def _run_token(self, module: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor,
                   top_k_weights: torch.Tensor) -> torch.Tensor | None:
        """One token (a decode step) with the eager numerics and a fraction of its small ops: the routing is
        read to the host once, each chosen expert (ascending ids) is scaled by its weight (a one-element view:
        the dtype promotion of eager's [1, 1] index) and added into zeros (index_add_ on one row). None where
        only the general path is exact: an expert chosen twice, or the no-expert id E."""
        ids = top_k_index.tolist()[0]
        if len(set(ids)) < len(ids) or max(ids) >= self.num_experts:
            return None
        layer = module.layer_idx
        self._count_tokens(layer, 1)
        weights = top_k_weights.tolist()[0]  # the cache policies' routing weights
        columns = top_k_weights.unbind(1)    # [1] each, one op for all k
        picks = sorted(range(len(ids)), key=ids.__getitem__)  # top-k positions by ascending expert id
        final = torch.zeros_like(hidden)
        observe = lambda: self._observe(layer, hidden, top_k_index, top_k_weights)  # noqa: E731
        select = lambda i, e: (1, weights[picks[i]], columns[picks[i]])  # noqa: E731
        for w, linear, weight in self._each_expert(layer, [ids[p] for p in picks], select, observe):
            y = expert_ffn(module, w, hidden, linear) * weight
            final.add_(y if y.dtype == final.dtype else y.to(final.dtype))
        return final

    def _run_replicated(self, module: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        E = self.num_experts
        layer = module.layer_idx
        x = hidden.view(E, -1, hidden.shape[-1])                      # [E, T, H]
        self._count_tokens(layer, x.shape[1])
        out = torch.zeros_like(x)
        active = x.abs().amax(dim=-1) > 0                              # [E, T]: rows of unselected experts are 0
        uses = torch.cat([active.sum(-1), active.new_zeros(1)])        # [E+1]
        experts = active.any(-1).nonzero()[:, 0].tolist()
        index = active.T.float().topk(self.top_k, dim=-1).indices      # [T, k]: the router's choice
        observe = lambda: self._observe(layer, None, index, None)  # noqa: E731
        for w, linear, i in self._each_expert(layer, experts, lambda i, e: (int(uses[e]), 0.0, i), observe):
            e = experts[i]
            out[e] = expert_ffn(module, w, x[e], linear)
        return out.view(-1, hidden.shape[-1])

    def _count_tokens(self, layer: int, tokens: int) -> None:
        if layer == self.moe_layers[0]:  # every token passes the first MoE layer once
            self.stats.tokens += tokens

    def _each_expert(self, layer: int, experts: list[int], select, observe):
        """Yield (slot views, linear, token selection) per expert, `select(i, expert)` giving (uses, routing
        weight, token selection), with this layer's keys pinned while they compute. `observe` (predict + submit
        prefetches) runs once they are pinned, so a prefetch can never evict an expert this layer is about to
        use. Without a predictor and with every key resident nothing can be inserted, so nothing is pinned."""
        keys = [(layer, e) for e in experts]
        cache = self.cache
        if self.predictor is not None:  # only prefetch asks what was used recently
            self._step += 1
            for k in keys:
                self._last_use[k] = self._step
            pins = True
        else:
            pins = not all(k in cache for k in keys)
        pin_all = pins and len(keys) <= cache.capacity - self.prefetcher.in_flight()
        pin_each = pins and not pin_all
        if pin_all:
            for k in keys:
                cache.pin(k)
        try:
            observe()
            for i, key in enumerate(keys):
                uses, weight, sel = select(i, key[1])
                slot = self.prefetcher.fetch(key, uses, weight)
                if pin_each:
                    cache.pin(key)
                try:
                    yield (*self._views(key, slot), sel)
                    self.prefetcher.used(slot)  # its compute is queued (a GPU may not have run it yet)
                finally:
                    if pin_each:
                        cache.unpin(key)
        finally:
            if pin_all:
                for k in keys:
                    cache.unpin(k)

    def _views(self, key, slot: int):
        """(slot tensors, linear) for `key`: dense views and plain matmuls, or a quantized kind's."""
        if self.codec is None:
            return self.slots.views(slot, self.store.layout_of(key)), None
        kind = self.store.format_of(key)
        return self.codec.views(self.slots, slot, kind), self.codec.kind_named(kind).linear

    # --- prediction and tracing ------------------------------------------------------------------
    def enter(self, layer: int, hidden: torch.Tensor) -> None:
        """The residual stream [B, T, H] enters the decoder layer holding MoE layer `layer` (a forward
        pre-hook calls this): lookahead-0 predictors predict this layer's experts here."""
        if self.entry:
            self._predict(layer, hidden, decode=hidden.reshape(-1, hidden.shape[-1]).shape[0] == 1)

    def attended(self, layer: int, out: torch.Tensor) -> None:
        """Decoder layer `layer`'s attention output [B, T, H] (a forward hook calls this), for predictors that
        use it (`GatePredictor.attended`)."""
        if self._attended is not None:
            self._attended(layer, out)

    def _observe(self, layer: int, hidden, top_k_index, top_k_weights) -> None:
        if self.tracer is not None:
            self.tracer.record(layer, top_k_index, top_k_weights)
        if self.predictor is None:
            return
        decode = top_k_index.shape[0] == 1
        if decode:
            self._score(layer, top_k_index)
        if hidden is not None and not self.entry:
            self._predict(layer, hidden, decode)
        self.predictor.observe(layer, top_k_index)

    @property
    def precision(self) -> float:
        """Prefetch precision (EMA over decode steps), averaged over the target layers scored so far."""
        return sum(self._precision.values()) / len(self._precision) if self._precision else 1.0

    def _paused(self, target: int) -> bool:
        return self._precision.get(target, 1.0) < self.min_precision

    @torch.no_grad()
    def _predict(self, layer: int, hidden: torch.Tensor, decode: bool) -> None:
        targets = self._targets(layer) if self._targets is not None else []
        if decode and targets and all(map(self._paused, targets)) and self.stats.tokens % PAUSED_EVERY:
            return  # every target paused: predict (to keep scoring) on every PAUSED_EVERY-th token only
        wanted = self.predictor.predict(layer, hidden)
        keys = []
        for tl, ids in wanted.items():
            k = self._k(tl)
            ids = ids[: self.prefetch_width - self.top_k + k]  # a trimmed layer keeps the same margin beyond k
            if decode:
                self._predicted[tl] = ids
            if self._paused(tl):
                self.stats.prefetch_suppressed += len(ids)
            else:  # the layer computes its experts in ascending id order: load the likeliest k in that order
                keys += [(tl, e) for e in sorted(ids[:k]) + ids[k:]]
        self.prefetcher.submit(keys, self._protected)

    def _k(self, layer: int) -> int:
        """Experts `layer` computes per token: the model's top-k, or its own under active_experts (LExI)."""
        return self.top_k if self.active is None else self.active.k[layer]

    def _protected(self, key) -> bool:
        """Whether a prefetch must not evict `key`: used during the last pass over the layers, or of a layer
        whose prefetching is paused. Such a layer's experts are missed unless they stay cached, so guesses for
        other layers must not push them out."""
        return self._step - self._last_use.get(key, -1 << 60) < len(self.moe_layers) or self._paused(key[0])

    def _score(self, layer: int, top_k_index: torch.Tensor) -> None:
        """Track how often predictions for `layer` come true (EMA over decode steps). A wrong prefetch evicts
        an expert that may be needed, so below `min_precision` prefetching into that layer pauses; predictions
        keep being scored, and prefetching resumes as soon as they are right often enough again. Per layer,
        because a predictor's accuracy is: the demo's gate d=0 is right 42% of the time at layer 0 and 86% at
        layer 1, and one average would pause both or run both."""
        predicted = self._predicted.pop(layer, None)
        if predicted:
            chosen = top_k_index[0].tolist()
            for e in set(predicted).difference(chosen):  # wrong guesses not yet being read: never read them
                self.prefetcher.cancel((layer, e))
            # precision of the top-k guess alone, so that the pause threshold means the same at any width
            # (ids beyond k are the next likeliest, a margin for a near miss)
            guess = set(predicted[: self._k(layer)])
            hit = len(guess.intersection(chosen)) / len(guess)
            p = self._precision.get(layer, 1.0)
            self._precision[layer] = p + self._precision_rate * (hit - p)

    def set_predictor(self, predictor) -> None:
        """Swap the predictor for one asked at the same place (layer entry or MoE input): the entry hooks are
        installed at load time. The benchmark uses it to put a trace-replaying oracle in a gate's seat."""
        if bool(getattr(predictor, "entry", False)) != self.entry:
            raise ValueError("the new predictor must have the same lookahead kind (0 or >= 1) as the old one")
        self.predictor, self._targets = predictor, predictor.targets
        self._attended = getattr(predictor, "attended", None)
        self.reset_prediction()

    def reset_prediction(self) -> None:
        """Forget what prediction learned (predictor state, precision, recent uses): the next run starts cold."""
        if self.predictor is not None:
            self.predictor.reset()
        self._precision, self._predicted = {}, {}
        self._step, self._last_use = 0, {}

    def close(self) -> None:
        self.prefetcher.close()
