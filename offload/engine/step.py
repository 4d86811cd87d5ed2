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
from offload.engine.low_bit import LowBitMiss
from offload.engine.prefetch import Prefetcher
from offload.engine.ram_tier import CopyGuard, PoolStore, RamTier
from offload.engine.slots import SlotPool
from offload.engine.stats import EngineStats


PRECISION_EMA = 0.05  # weight of one layer's score in the prefetch-precision average, times the MoE layers
PAUSED_EVERY = 4      # while prefetch is paused, predictions (only scored) run on one token in this many


class Engine:
    def __init__(self, store, cache: ExpertCache, slots: SlotPool, num_experts: int, top_k: int,
                 moe_layers: list[int], predictor=None, prefetch_width: int | None = None,
                 codec=None, tracer=None, min_precision: float = 0.75, worker: str = "thread",
                 ram: RamTier | None = None, miss=None, host_codec=None, tier: str = "device",
                 low_bit: LowBitMiss | None = None) -> None:
        """`ram`: a RAM tier between `store` and the device slots, `miss` deciding per device miss whether its
        record is copied or computed on the CPU (`offload.engine.miss`), `host_codec` the codec of the RAM
        tier's records (a CPU twin of `codec`). `tier`: what the slots are called in the tier counts ("ram" on
        a CPU machine whose one pool is the RAM tier, computed in place). `low_bit`: low-bit copies serving
        low-weight device misses (HOBBIT, `offload.engine.low_bit`)."""
        self.store, self.cache, self.slots = store, cache, slots
        self.num_experts, self.top_k, self.moe_layers = num_experts, top_k, moe_layers
        self.stats = EngineStats()
        self.ram, self.miss, self.host_codec, self.tier, self.low_bit = ram, miss, host_codec, tier, low_bit
        self.cpu_experts = 0  # expert uses computed on the CPU from the RAM tier (a pool computed in place: all)
        self.hot: list = []   # the static hot set, pinned in the device tier (`pin_hot`)
        self._cuda = slots.device.type == "cuda"
        source = store if ram is None else PoolStore(ram)
        # on CPU the RAM tier holds records in compute form already: a copy into a slot is a plain copy
        transform = (None if codec is None or (ram is not None and not self._cuda) else
                     (lambda key, rec, slot: codec.transform(store.format_of(key), rec, slot)))
        self._guard = CopyGuard(ram.cache) if ram is not None and self._cuda else None
        hold = release = None
        if ram is not None:  # a device prefetch reads a RAM record: it stays pinned there until the copy ran
            hold = ram.cache.pin
            release = lambda key, event: self._unpin_ram(key, event)  # noqa: E731
        self.prefetcher = Prefetcher(source, cache, slots, self.stats, transform=transform, worker=worker,
                                     hold=hold, release=release)
        # where predictions are read from disk: into the RAM tier when there is one
        self.loader = self.prefetcher if ram is None else ram.prefetcher
        self._scratch = None  # CUDA: a CPU slot for a RAM record turned into CPU compute form
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
        outs = [None] * len(experts)
        for i, w, linear, (top_k_pos, token_idx), host in self._each_expert(layer, experts, select, observe):
            y = self._ffn(module, w, hidden[token_idx], linear, host)
            outs[i] = (token_idx, y * top_k_weights[token_idx, top_k_pos, None])
        for token_idx, y in outs:  # ascending expert ids, as eager adds them
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
        outs = [None] * len(picks)
        for i, w, linear, weight, host in self._each_expert(layer, [ids[p] for p in picks], select, observe):
            outs[i] = self._ffn(module, w, hidden, linear, host) * weight
        for y in outs:  # ascending expert ids
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
        for i, w, linear, _, host in self._each_expert(layer, experts, lambda i, e: (int(uses[e]), 0.0, i), observe):
            e = experts[i]
            out[e] = self._ffn(module, w, x[e], linear, host)
        return out.view(-1, hidden.shape[-1])

    def _count_tokens(self, layer: int, tokens: int) -> None:
        if layer == self.moe_layers[0]:  # every token passes the first MoE layer once
            self.stats.tokens += tokens

    def _ffn(self, module: nn.Module, w: dict, x: torch.Tensor, linear, host: bool) -> torch.Tensor:
        """One expert on x; `host`: its weights are a RAM record, computed on the CPU."""
        if host and self._cuda:
            return expert_ffn(module, w, x.cpu(), linear).to(x.device, non_blocking=True)
        return expert_ffn(module, w, x, linear)

    def _each_expert(self, layer: int, experts: list[int], select, observe):
        """Yield (position, weights, linear, token selection, on the CPU from RAM) per expert, `select(i,
        expert)` giving (uses, routing weight, token selection), with this layer's keys pinned while they
        compute. `observe` (predict + submit prefetches) runs once they are pinned, so a prefetch can never
        evict an expert this layer is about to use. Without a predictor and with every key resident nothing
        can be inserted, so nothing is pinned. With a RAM tier on CUDA, device-resident experts are queued
        first, so the GPU runs them while the CPU computes the others; callers combine by position."""
        keys = [(layer, e) for e in experts]
        cache = self.cache
        if self.predictor is not None:  # only prefetch asks what was used recently
            self._step += 1
            for k in keys:
                self._last_use[k] = self._step
            pins = True
        else:
            pins = not all(k in cache for k in keys)
        # the hot set's slots are pinned for good: count them, though some may be this layer's
        pin_all = pins and len(keys) + len(self.hot) <= cache.capacity - self.prefetcher.in_flight()
        pin_each = pins and not pin_all
        if pin_all:
            for k in keys:
                cache.pin(k)
        try:
            observe()
            order = range(len(keys))
            if self.ram is not None and self._cuda:
                order = sorted(order, key=lambda i: keys[i] not in cache)
            for i in order:
                key = keys[i]
                uses, weight, sel = select(i, key[1])
                if (self.low_bit is not None and key not in cache
                        and self.low_bit.serves(key, weight / uses, self.stats.tokens, uses)):
                    yield (i, *self.low_bit.views(key), sel, True)
                    continue
                if self.ram is not None and key not in cache:
                    yield from self._from_ram(i, key, uses, weight, sel)
                    continue
                slot = self.prefetcher.fetch(key, uses, weight)
                if pin_each:
                    cache.pin(key)
                try:
                    yield (i, *self._views(key, slot), sel, False)
                    self.prefetcher.used(slot)  # its compute is queued (a GPU may not have run it yet)
                finally:
                    if pin_each:
                        cache.unpin(key)
        finally:
            if pin_all:
                for k in keys:
                    cache.unpin(k)

    def _from_ram(self, i: int, key, uses: int, weight: float, sel):
        """A device miss: the RAM tier serves it (a RAM hit, or a demand read from disk into RAM), then the
        record is copied into a device slot or computed on the CPU where it lies, as `miss` decides."""
        ram = self.ram
        if self._guard is not None:
            self._guard.release_done()
        copy = self.miss.copy(key, weight)
        # a copied expert's other uses in this step hit on the device: the RAM tier serves one
        rslot = ram.prefetcher.fetch(key, 1 if copy else uses, weight)
        ram.cache.pin(key)
        try:
            if copy:
                slot = self.prefetcher.fetch(key, uses, weight)
                if self._guard is not None:  # the copy out of the record is queued, not done
                    event = torch.cuda.Event()
                    event.record(torch.cuda.current_stream(self.slots.device))
                    self._guard.hold(key, event)
                yield (i, *self._views(key, slot), sel, False)
                self.prefetcher.used(slot)
            else:
                self.cpu_experts += uses
                yield (i, *self._host_views(key, rslot), sel, True)
        finally:
            ram.cache.unpin(key)

    def _unpin_ram(self, key, event) -> None:
        if self._guard is not None and event is not None:
            self._guard.hold(key, event)  # CUDA: until the asynchronous copy out of the record has run
        self.ram.cache.unpin(key)

    def _host_views(self, key, rslot: int):
        """(weights, linear) of the RAM record in `rslot`, in CPU compute form: in place on a CPU machine; on
        CUDA the stored record is turned into it in a scratch slot (its compute finishes before the next)."""
        ram, codec = self.ram, self.host_codec
        if codec is None:
            return ram.slots.views(rslot, self.store.layout_of(key)), None
        kind = self.store.format_of(key)
        if not self._cuda:
            return codec.views(ram.slots, rslot, kind), codec.kind_named(kind).linear
        if self._scratch is None:
            self._scratch = SlotPool(1, codec.slot_bytes, torch.device("cpu"))
        codec.transform(kind, ram.slots.raw(rslot), self._scratch.raw(0))
        return codec.views(self._scratch, 0, kind), codec.kind_named(kind).linear

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
        self.loader.submit(keys, self._protected)
        if self.ram is not None:  # and the guesses already in RAM go on to the device on the second link
            ram = self.ram
            self.prefetcher.submit([k for k in keys if k in ram.cache and not ram.prefetcher.loading(k)
                                    and self.miss.copy(k, 0.0)], self._protected)

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
                self.loader.cancel((layer, e))
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

    def pin_hot(self, keys: list) -> None:
        """Load `keys` into the device tier and pin them there for good (the static hot set)."""
        self.hot = list(keys)
        for key in self.hot:
            if key in self.cache:
                self.cache.pin(key)
                continue
            if self.ram is not None:
                self.ram.prefetcher.fetch(key)
                self.ram.cache.pin(key)
            try:
                self.prefetcher.fetch(key)
            finally:
                if self.ram is not None:
                    self.ram.cache.unpin(key)
            self.cache.pin(key)

    def tier_counts(self) -> dict:
        """Where each expert use was served: device hits + RAM hits + disk reads (+ low-bit computes) == uses,
        exactly."""
        counts = self._tier_counts()
        if self.low_bit is not None:
            counts["low_bit_computes"] = self.low_bit.computes
        return counts

    def _tier_counts(self) -> dict:
        c, ram = self.cache.stats, self.ram
        if ram is not None:
            return {"device_hits": c.hits, "ram_hits": ram.cache.stats.hits, "disk_reads": ram.cache.stats.misses,
                    "cpu_experts": self.cpu_experts}
        if self.tier == "ram":  # one pool that is the RAM tier, computed in place
            return {"device_hits": 0, "ram_hits": c.hits, "disk_reads": c.misses, "cpu_experts": c.hits + c.misses}
        reads = "disk_reads" if self.store.tier == "disk" else "checkpoint_reads"
        return {"device_hits": c.hits, "ram_hits": 0, reads: c.misses, "cpu_experts": 0}

    def link_stats(self) -> dict:
        """Bytes and stall per link: disk -> RAM (the RAM tier's loads) and into the device slots."""
        s = self.stats
        into = "ram->device" if self.ram is not None else f"{self.store.tier}->{self.tier}"
        links = {into: {"bytes": sum(s.bytes_loaded.values()), "loads": s.loads, "stall_seconds": s.stall_seconds}}
        if self.ram is not None:
            r = self.ram.stats
            links["disk->ram"] = {"bytes": sum(r.bytes_loaded.values()), "loads": r.loads,
                                  "stall_seconds": r.stall_seconds}
        return links

    def close(self) -> None:
        self.prefetcher.close()
        if self.ram is not None:
            self.ram.close()
