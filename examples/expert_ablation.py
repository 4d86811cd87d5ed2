"""How much do a model's experts matter? Held-out perplexity with the experts as trained, with 50% relative
noise on every expert's down_proj, and with the experts zeroed (stock transformers, no offloading).

    python examples/expert_ablation.py [MODEL_DIR] [--tokens 1024]
"""
import argparse
import math
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ap = argparse.ArgumentParser()
ap.add_argument("model_dir", nargs="?", default=str(Path(__file__).parents[1] / "offload" / "demo_model"))
ap.add_argument("--tokens", type=int, default=1024)
args = ap.parse_args()
torch.set_num_threads(1)
tok = AutoTokenizer.from_pretrained(args.model_dir)
text = (Path(args.model_dir) / "heldout.txt").read_text()
ids = tok(text, return_tensors="pt").input_ids[:, : args.tokens]
for mode in ("as trained", "50% noise on down_proj", "experts zeroed"):
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.bfloat16, experts_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("experts.down_proj"):
                continue
            if mode == "experts zeroed":
                p.zero_()
            elif mode.startswith("50%"):
                g = torch.Generator().manual_seed(0)
                p.add_((torch.randn(p.shape, generator=g) * p.float().std() * 0.5).to(p.dtype))
        print(f"{mode:>24}: perplexity {math.exp(model(ids, labels=ids).loss.item()):.2f}")
