"""Where one moe-offload decode token's time goes (a Mixtral checkpoint, every expert resident, 1 thread), by
ablation: each variant removes one more component (patched to return zeros of the right shape) on the same
teacher-forced tokens after the same prompt; the order alternates every round; medians.

    python examples/token_time_ablation.py MODEL_DIR --store-dir DIR [--bits int4-g128] [--dense-bits 4]
                                           [--tokens 64] [--rounds 5]

  full              everything
  -expert kernel    the expert records' matmuls (offload.formats.record.qlinear) return zeros; the engine and
                    the expert module's Python and small ops stay
  -dense kernels    q/k/v/o and lm_head (QuantizedLinear under --dense-bits, else nn.Linear) return zeros
  -sdpa             the attention function (scaled_dot_product_attention) returns zeros
  -rope             apply_rotary_pos_emb returns q, k unchanged
  -rmsnorm          MixtralRMSNorm returns its input
  -experts module   the offloaded experts' forward returns zeros (no engine at all)
  -router           MixtralTopKRouter.forward returns a fixed (logits, weights, index)
What is left: embedding, residual adds, KV cache update, decoder-layer / attention / model glue, rotary
cos/sin, mask. Also generate()'s per-token time against this manual loop.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from collections.abc import Iterator

import torch
import transformers.models.mixtral.modeling_mixtral as mm
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import offload.formats.record as record
from offload.bench.peers import PROMPT_TEXT
from offload.formats.dense_linears import QuantizedLinear
from offload.model import OffloadedModel

VARIANTS = ["full", "-expert kernel", "-dense kernels", "-sdpa", "-rope", "-rmsnorm", "-experts module", "-router"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("--store-dir", required=True)
    ap.add_argument("--bits", default="int4-g128")
    ap.add_argument("--dense-bits", type=int, default=None)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    om = OffloadedModel.from_pretrained(args.model_dir, bits=args.bits, store="disk", store_dir=args.store_dir,
                                        cache_experts="100%", dense_bits=args.dense_bits)
    hf = om.model
    ids = om.tokenizer(PROMPT_TEXT, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = om.generate(ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False)
    forced = out[0, ids.shape[1]:].tolist()
    experts_cls = next(type(m) for m in hf.modules() if type(m).__name__.startswith("Offloaded"))
    fixed: dict = {}

    @torch.inference_mode()
    def decode_loop() -> float:
        o = hf(ids, use_cache=True)
        pkv = o.past_key_values
        t = time.perf_counter()
        for tok in forced:
            o = hf(torch.tensor([[tok]]), past_key_values=pkv, use_cache=True)
            pkv = o.past_key_values
        return (time.perf_counter() - t) / len(forced)

    @torch.inference_mode()
    def gen_per_token() -> float:
        t = time.perf_counter()
        om.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        t1 = time.perf_counter() - t
        t = time.perf_counter()
        om.generate(ids, max_new_tokens=len(forced) + 1, min_new_tokens=len(forced) + 1, do_sample=False)
        return (time.perf_counter() - t - t1) / len(forced)

    @contextlib.contextmanager
    def patched(level: int) -> Iterator[None]:
        saved = []

        def patch(obj, name, new):
            saved.append((obj, name, getattr(obj, name)))
            setattr(obj, name, new)
        if level >= 1:
            patch(record, "qlinear", lambda x, r, f, shape: torch.zeros(*x.shape[:-1], int(shape[0]), dtype=x.dtype))
        if level >= 2:
            linear = QuantizedLinear if args.dense_bits else torch.nn.Linear
            patch(linear, "forward", lambda self, x: torch.zeros(*x.shape[:-1], self.out_features, dtype=x.dtype))
        if level >= 3:
            name = hf.config._attn_implementation
            saved.append((ALL_ATTENTION_FUNCTIONS, name, ALL_ATTENTION_FUNCTIONS[name]))
            ALL_ATTENTION_FUNCTIONS[name] = lambda module, q, *a, **k: (q.new_zeros(q.shape[0], q.shape[2], q.shape[1],
                                                                                    q.shape[3]), None)
        if level >= 4:
            patch(mm, "apply_rotary_pos_emb", lambda q, k, *a, **kw: (q, k))
        if level >= 5:
            patch(mm.MixtralRMSNorm, "forward", lambda self, x: x)
        if level >= 6:
            patch(experts_cls, "forward", lambda self, h, *a, **k: torch.zeros_like(h))
        if level >= 7:
            orig = mm.MixtralTopKRouter.forward

            def router(self, h):
                if "r" not in fixed:  # one real routing, replayed: top-k output of the right shape and dtype
                    fixed["r"] = tuple(t.clone() for t in orig(self, h))
                return fixed["r"]
            patch(mm.MixtralTopKRouter, "forward", router)
        try:
            yield
        finally:
            for obj, name, old in reversed(saved):
                if obj is ALL_ATTENTION_FUNCTIONS:
                    obj[name] = old
                else:
                    setattr(obj, name, old)

    for lvl in range(len(VARIANTS)):  # warm every variant once
        with patched(lvl):
            decode_loop()
    gen = "generate() per token (full)"
    raw: dict[str, list[float]] = {v: [] for v in [*VARIANTS, gen]}
    print(f"bits {args.bits}, dense_bits {args.dense_bits}, prompt {ids.shape[1]} tokens, {len(forced)} forced; "
          f"load average before {os.getloadavg()[0]:.2f}", flush=True)
    for r in range(args.rounds):
        order = list(range(len(VARIANTS))) if r % 2 == 0 else list(reversed(range(len(VARIANTS))))
        if r % 2 == 0:
            raw[gen].append(gen_per_token())
        for lvl in order:
            with patched(lvl):
                raw[VARIANTS[lvl]].append(decode_loop())
        if r % 2 == 1:
            raw[gen].append(gen_per_token())
    med = {k: statistics.median(v) * 1e3 for k, v in raw.items()}
    names = ["expert kernel", "dense kernels: q/k/v/o and lm_head matmuls", "SDPA", "RoPE", "RMSNorm",
             "engine + experts module: Python, routing bookkeeping, gate activation, combine",
             "router (gate linear, softmax, top-k)"]
    parts = [(n, med[VARIANTS[i]] - med[VARIANTS[i + 1]]) for i, n in enumerate(names)]
    parts += [("rest: embedding, residuals, KV cache update, HF glue", med[VARIANTS[-1]]),
              ("generate() on top of the manual loop", med[gen] - med["full"])]
    print(f"\none decode token, median of {args.rounds} rounds: full loop {med['full']:.2f} ms "
          f"({1e3 / med['full']:.1f} tok/s), generate() {med[gen]:.2f} ms; load average after "
          f"{os.getloadavg()[0]:.2f}")
    print("\n| part | ms | share of the loop |\n|---|---:|---:|")
    for name, ms in parts:
        print(f"| {name} | {ms:.2f} | {100 * ms / med['full']:.0f}% |")


if __name__ == "__main__":
    main()
