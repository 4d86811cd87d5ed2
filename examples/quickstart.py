"""Quickstart: chat-free use of the Python API on the shipped demo model (or any local MoE checkpoint).

    python examples/quickstart.py [MODEL_DIR]
"""
import sys
from pathlib import Path

from offload import OffloadedModel

model_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parents[1] / "offload" / "demo_model"
model = OffloadedModel.from_pretrained(model_dir, cache_experts="25%", store="ram", policy="lru", predictor="gate")
tok = model.tokenizer
ids = tok("It was a bright cold day in April, and", return_tensors="pt")["input_ids"]
out = model.generate(ids, max_new_tokens=40, do_sample=False)
print(tok.decode(out[0], skip_special_tokens=True))
s = model.stats()
print(f"hit rate {s['hit_rate']:.1%}, {s['misses']} misses, {sum(s['bytes_loaded'].values()) / 2**20:.1f} MiB moved, "
      f"{s['resident_experts']}/{s['total_experts']} experts resident")
model.close()
