"""The shipped demo model with every expert zero-padded to FACTOR times its width: same routing, bigger reads.

    python examples/widen_demo.py OUT_DIR [--factor 4]

Each expert's gate/up projections gain (FACTOR-1) x 288 random rows and its down projection the matching
columns, scaled by 1e-30 (moe_intermediate_size 288 -> 288 x FACTOR). The extra units add ~1e-30 to
outputs of order 1e-2..1, far below one rounding step, so the model generates exactly the demo's tokens
(checked below) and its routers choose the demo's trained experts, while each expert costs FACTOR times the
bytes to read and the FLOPs to apply. Random, not zero, padding: the store would lz4-compress zeros away. That is the regime of real MoE checkpoints,
whose experts are megabytes (Mixtral's are 88 MB in int4), with the demo's trained routing: what the
prefetch benchmark needs and what a random checkpoint cannot give (its routing is not a trained model's).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

DEMO = Path(__file__).resolve().parents[1] / "offload" / "demo_model"
_EXPERT = re.compile(r"\.experts\.\d+\.(gate_proj|up_proj|down_proj)\.weight$")


def widen(out: Path, factor: int) -> None:
    if factor < 1:
        raise SystemExit(f"--factor must be at least 1, got {factor}")
    config = json.loads((DEMO / "config.json").read_text())
    width = config["moe_intermediate_size"]
    extra = width * (factor - 1)
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, t in load_file(DEMO / "model.safetensors").items():
        m = _EXPERT.search(name)
        if m is None:
            tensors[name] = t
        elif m.group(1) == "down_proj":  # [hidden, width] -> [hidden, width * factor]
            pad = 1e-30 * torch.randn(t.shape[0], extra, generator=g)
            tensors[name] = torch.cat([t, pad.to(t.dtype)], dim=1)
        else:                            # [width, hidden] -> [width * factor, hidden]
            pad = t.float().std() * torch.randn(extra, t.shape[1], generator=g)
            tensors[name] = torch.cat([t, pad.to(t.dtype)], dim=0)
    out.mkdir(parents=True, exist_ok=True)
    for f in DEMO.iterdir():
        if f.name not in ("model.safetensors", "config.json", "training_info.json"):
            shutil.copy(f, out / f.name)
    tmp = out / "model.safetensors.tmp"
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, out / "model.safetensors")
    config["moe_intermediate_size"] = width * factor
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"{out}: demo experts widened {width} -> {width * factor} (x{factor}), "
          f"{3 * width * factor * config['hidden_size'] * 2 / 1e6:.2f} MB per bf16 expert")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--factor", type=int, default=4)
    args = ap.parse_args()
    widen(args.out, args.factor)


if __name__ == "__main__":
    main()
