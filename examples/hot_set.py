"""The static hot set against LRU alone: device hit rate over held-out generations, with the hot set taken
from a warm-up text, and from a trace of the very same generations (the ceiling of any static hot set).

  python examples/hot_set.py [MODEL_DIR] --store-dir DIR [--bits int4-g32] [--slots 16,24]

MODEL_DIR defaults to the shipped demo, whose calibration.txt is the warm-up text and heldout.txt the prompts.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

import offload
from offload import OffloadedModel

PROMPTS, PROMPT_TOKENS, NEW_TOKENS = 4, 48, 64


def prompts(model: OffloadedModel, text: str) -> list[torch.Tensor]:
    step = len(text) // PROMPTS
    return [model.tokenizer(text[i * step: i * step + 400], return_tensors="pt").input_ids[:, :PROMPT_TOKENS]
            for i in range(PROMPTS)]


def hit_rate(model: OffloadedModel, ids: list[torch.Tensor]) -> float:
    """Mean device hit rate over the prompts, each from a cold cache (the hot set stays)."""
    rates = []
    for x in ids:
        model.reset_cache()
        model.generate(x, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
        rates.append(model.stats()["hit_rate"])
    return sum(rates) / len(rates)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default=str(Path(offload.__file__).parent / "demo_model"))
    p.add_argument("--store-dir", required=True)
    p.add_argument("--bits", default="int4-g32")
    p.add_argument("--slots", default="16,24", help="device slots, comma-separated")
    a = p.parse_args()
    torch.set_num_threads(1)
    model_dir = Path(a.model)
    opts = dict(store_dir=a.store_dir, bits=a.bits)
    rec = OffloadedModel.from_pretrained(model_dir, trace=True, **opts)
    ids = prompts(rec, (model_dir / "heldout.txt").read_text())
    for x in ids:
        rec.generate(x, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    trace = Path(tempfile.mkdtemp()) / "same_workload.npz"
    rec.trace().save(trace)
    rec.close()
    print("| device slots | LRU alone | hot set from a warm-up on calibration.txt | hot set from the same workload's trace |")
    print("|---:|---:|---:|---:|")
    for n in map(int, a.slots.split(",")):
        row = []
        for hot in (None, str(model_dir / "calibration.txt"), str(trace)):
            m = OffloadedModel.from_pretrained(model_dir, cache_experts=n, hot_set=hot, **opts)
            row.append(f"{hit_rate(m, ids):.3f}")
            m.close()
        print(f"| {n} | " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
