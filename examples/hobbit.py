"""HOBBIT mixed precision on a miss, on the demo model: quality, stall, bytes and speed against demand loading.

  PYTHONPATH=. python examples/hobbit.py [--thresholds 0.1,0.2,0.3] [--store /tmp/hobbit-store] [--rounds 3]

Every row runs experts from an int4-g32 disk store (direct I/O) with 25% of them resident (no predictor):
demand loading (every miss reads the full int4 record), HOBBIT (low_bit_miss='int2-g32') at each threshold,
and, for scale, the whole model in int2-g32 (--low-bit) loaded on demand. Quality: perplexity on the first
1024 tokens of offload/demo_model/heldout.txt decoded one token at a time (teacher forcing, 4 windows of 256
tokens, KV cache per window, the expert cache carried on: every step is a decode step, as HOBBIT serves them),
the same text scored in 512-token prefill windows (offload.bench.formats.perplexity), and greedy agreement with
the bf16 checkpoint (all resident) over 64 new tokens from 8 prompts of that text. Traffic, from the decode
pass: bytes read from the store, full loads and low-bit computes per token, and how often its next-token
argmax is bf16's in the same context (top-1 agreement). Speed: decode-only tok/s and stall (time waiting for
demand loads) per token over 32 new tokens (offload.bench.common.measure_decode, cold cache), rows measured
alternately --rounds times, medians.
"""
from __future__ import annotations

import argparse
import math
import statistics

import torch
import torch.nn.functional as F

from offload import OffloadedModel
from offload.bench.common import measure_decode
from offload.bench.formats import agreement, greedy, heldout_ids, perplexity
from offload.cli.common import DEMO_MODEL

MAIN, LOW, CACHE = "int4-g32", "int2-g32", "25%"


@torch.inference_mode()
def decode_perplexity(m: OffloadedModel, ids: torch.Tensor, window: int = 256) -> dict:
    """Teacher-forced decode over ids [1, T] in windows: perplexity and the run's per-token traffic."""
    m.reset_cache()
    nll, n, top1 = 0.0, 0, []
    for begin in range(0, ids.shape[1] - 1, window):
        chunk = ids[:, begin:begin + window]
        cache = None
        for i in range(chunk.shape[1] - 1):
            out = m.model(input_ids=chunk[:, i:i + 1], cache=cache, use_cache=True)
            cache = out.cache
            logits = out.logits[0, -1].float()
            nll += F.cross_entropy(logits, chunk[0, i + 1]).item()
            top1.append(int(logits.argmax()))
            n += 1
    s = m.stats()
    low = s["low_bit"] or {"computes": 0, "loads_avoided": 0, "promoted": 0}
    return {"ppl": math.exp(nll / n), "tokens": n, "bytes_per_token": sum(s["bytes_loaded"].values()) / n,
            "loads_per_token": s["misses"] / n, "low_bit_per_token": low["computes"] / n, "promoted": low["promoted"],
            "uses": s["hits"] + s["misses"] + low["computes"], "top1": top1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--thresholds", default="0.1,0.2,0.3")
    ap.add_argument("--store", default="/tmp/hobbit-store")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--low-bit", action="store_true", help="add the whole model in int2-g32 as a row")
    args = ap.parse_args()
    torch.set_num_threads(1)
    configs = {"demand loading (int4-g32)": dict(store_dir=args.store, bits=MAIN)}
    for t in (float(x) for x in args.thresholds.split(",")):
        configs[f"HOBBIT int2-g32 < {t:g}"] = dict(store_dir=args.store, bits=MAIN, low_bit_miss=LOW,
                                                   low_bit_threshold=t)
    if args.low_bit:
        configs["all int2-g32, demand"] = dict(store_dir=args.store + "-int2", bits=LOW)
    models = {name: OffloadedModel.from_pretrained(DEMO_MODEL, cache_experts=CACHE, **o) for name, o in configs.items()}
    rows: dict[str, dict] = {}
    with OffloadedModel.from_pretrained(DEMO_MODEL, cache_experts="100%") as bf16, torch.inference_mode():
        ids = heldout_ids(bf16.tokenizer, DEMO_MODEL / "heldout.txt", 1024)
        prompts = [ids[:, i * 128:i * 128 + 32] for i in range(8)]
        refs = [greedy(bf16, p, 64) for p in prompts]
        rows["bf16, all resident"] = {"prefill_ppl": perplexity(bf16, ids, 512)[0], "agreement": 1.0,
                                      **decode_perplexity(bf16, ids)}
    with torch.inference_mode():
        for name, m in models.items():
            r = rows[name] = decode_perplexity(m, ids)
            r["prefill_ppl"] = perplexity(m, ids, 512)[0]
            r["agreement"] = statistics.mean(agreement(ref, greedy(m, p, 64))[0] for ref, p in zip(refs, prompts))
        decode_ids = ids[:, :32]
        samples: dict[str, list[dict]] = {name: [] for name in models}
        for m in models.values():
            measure_decode(m, decode_ids, 2)  # one discarded run each: first-call costs
        for _ in range(args.rounds):
            for name, m in models.items():
                samples[name].append(measure_decode(m, decode_ids, 32))
    for name, m in models.items():
        for k in ("tok_s", "stall_ms_per_token"):
            rows[name][k] = statistics.median(s[k] for s in samples[name])
        m.close()
    base, ref = rows["demand loading (int4-g32)"], rows["bf16, all resident"]["top1"]
    print("| row | decode ppl | prefill ppl | top-1 agreement vs bf16 | greedy agreement vs bf16 | KB read/token | "
          "full loads/token | low-bit computes/token | promoted | stall ms/token | decode tok/s | vs demand |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        top1 = sum(a == b for a, b in zip(ref, r["top1"])) / len(ref)
        speed = (f"{r['stall_ms_per_token']:.2f} | {r['tok_s']:.1f} | {r['tok_s'] / base['tok_s']:.2f}x"
                 if "tok_s" in r else "- | - | -")
        print(f"| {name} | {r['ppl']:.3f} | {r['prefill_ppl']:.3f} | {top1:.1%} | {r['agreement']:.1%} | "
              f"{r['bytes_per_token'] / 1e3:.1f} | {r['loads_per_token']:.2f} | {r['low_bit_per_token']:.2f} | "
              f"{r['promoted']} | {speed} |")
    print(f"decode pass: {base['tokens']} tokens, {base['uses'] / base['tokens']:.0f} expert uses per token")


if __name__ == "__main__":
    main()
