"""LExI on a model (default: the demo): per-layer k, perplexity, greedy agreement, hit rate and decode speed
per FRACTION, side by side in one process (see docs/formats.md, "Per-layer active experts (LExI)").

  PYTHONPATH=. python examples/active_experts.py [MODEL_DIR] [--fractions 1,0.875,0.75,0.5] [--rounds 5] [--json FILE]
  PYTHONPATH=. python examples/active_experts.py --every-allocation 0.75

  PYTHONPATH=. python examples/active_experts.py --prefetch --fractions 1,0.75

--every-allocation F: perplexity of every per-layer k with F's budget (what LExI's choice is up against).
--prefetch: hits, misses and prefetch counts over 48 greedy tokens with the gate predictor (lookahead 0).

Every fraction is loaded at once with cache_experts="25%" and store="ram" (no predictor). Quality: perplexity
on the first 2048 tokens of MODEL_DIR/heldout.txt (offload.bench.formats.perplexity, window 512), greedy
agreement with FRACTION=1 over 64 new tokens from 8 prompts of that text. Speed: decode-only tok/s and hit rate
over 32 new tokens (offload.bench.common.measure_decode, cache warm from the previous run), the fractions
measured alternately, --rounds times, medians.
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
from pathlib import Path

import torch

from offload import OffloadedModel
from offload.bench.common import measure_decode
from offload.bench.formats import agreement, greedy, heldout_ids, perplexity
from offload.cli.common import DEMO_MODEL
from offload.engine.active_experts import ActiveExperts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", nargs="?", type=Path, default=DEMO_MODEL)
    ap.add_argument("--fractions", default="1,0.875,0.75,0.5")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", default=None)
    ap.add_argument("--every-allocation", type=float, default=None)
    ap.add_argument("--prefetch", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.prefetch:
        return prefetch(args.model_dir, [float(f) for f in args.fractions.split(",")])
    if args.every_allocation is not None:
        return every_allocation(args.model_dir, args.every_allocation)
    fractions = [float(f) for f in args.fractions.split(",")]
    models = {f: OffloadedModel.from_pretrained(args.model_dir, cache_experts="25%", store="ram", active_experts=f)
              for f in fractions}
    first = models[fractions[0]]
    ids = heldout_ids(first.tokenizer, args.model_dir / "heldout.txt", 2048)
    prompts = [ids[:, i * 256:i * 256 + 32] for i in range(8)]
    rows = {}
    with torch.inference_mode():
        refs = [greedy(first, p, 64) for p in prompts]
        for f, m in models.items():
            ppl, n = perplexity(m, ids, 512)
            agree = statistics.mean(agreement(r, greedy(m, p, 64))[0] for r, p in zip(refs, prompts))
            rows[f] = {"k": m.stats()["active_experts"], "ppl": ppl, "scored": n, "agreement": agree}
        decode_ids = ids[:, :32]
        samples: dict[float, list[dict]] = {f: [] for f in fractions}
        for m in models.values():
            measure_decode(m, decode_ids, 2, cold=False)  # one discarded run each: first-call costs
        for _ in range(args.rounds):
            for f, m in models.items():
                samples[f].append(measure_decode(m, decode_ids, 32, cold=False))
    for f, m in models.items():
        med = {k: statistics.median(s[k] for s in samples[f]) for k in ("tok_s", "hit_rate", "bytes_per_token")}
        rows[f].update(med, misses_per_token=med["bytes_per_token"] / m.stats()["expert_bytes"],
                       uses_per_token=sum(rows[f]["k"].values()))
        m.close()
    base = rows[fractions[0]]
    print("| FRACTION | per-layer k | experts/token | perplexity | vs 1.0 | greedy agreement | hit rate | "
          "misses/token | decode tok/s | vs 1.0 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for f, r in rows.items():
        print(f"| {f:g} | {' '.join(str(r['k'][layer]) for layer in sorted(r['k']))} | {r['uses_per_token']} | "
              f"{r['ppl']:.3f} | {100 * (r['ppl'] / base['ppl'] - 1):+.1f}% | {r['agreement']:.1%} | "
              f"{r['hit_rate']:.1%} | {r['misses_per_token']:.2f} | {r['tok_s']:.1f} | "
              f"{r['tok_s'] / base['tok_s']:.2f}x |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({str(f): r for f, r in rows.items()}, fh, indent=1, default=str)


def every_allocation(model_dir: Path, fraction: float) -> None:
    """Perplexity of each per-layer k spending `fraction`'s budget, LExI's own choice marked."""
    with OffloadedModel.from_pretrained(model_dir, cache_experts="100%", active_experts=fraction) as m:
        chosen, top_k = m.engine.active, m.engine.top_k
        ids = heldout_ids(m.tokenizer, model_dir / "heldout.txt", 2048)
        layers = sorted(chosen.k)
        with torch.inference_mode():
            m.engine.active = None
            base, _ = perplexity(m, ids, 512)
            print(f"| per-layer k | perplexity | vs all top-{top_k} |\n|---|---|---|")
            for ks in itertools.product(range(1, top_k + 1), repeat=len(layers)):
                if sum(ks) != chosen.per_token():
                    continue
                m.engine.active = ActiveExperts(dict(zip(layers, ks)), top_k, chosen.routing)
                ppl, _ = perplexity(m, ids, 512)
                mark = " (LExI)" if list(ks) == [chosen.k[layer] for layer in layers] else ""
                print(f"| {' '.join(map(str, ks))}{mark} | {ppl:.3f} | {100 * (ppl / base - 1):+.1f}% |")


def prefetch(model_dir: Path, fractions: list[float]) -> None:
    """What a trimmed layer does to prefetching: gate d=0 at 25% cache, 48 greedy tokens per fraction."""
    print("| FRACTION | hits | misses | prefetch issued | useful | suppressed | precision |\n|---|---|---|---|---|---|---|")
    for f in fractions:
        with OffloadedModel.from_pretrained(model_dir, cache_experts="25%", active_experts=f, predictor="gate",
                                            lookahead=0) as m:
            ids = heldout_ids(m.tokenizer, model_dir / "heldout.txt", 64)[:, :32]
            greedy(m, ids, 48)
            s = m.stats()
            print(f"| {f:g} | {s['hits']} | {s['misses']} | {s['prefetch_issued']} | {s['prefetch_useful']} | "
                  f"{s['prefetch_suppressed']} | {s['prefetch_precision']:.2f} |")


if __name__ == "__main__":
    main()
