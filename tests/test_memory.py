"""Loading never pulls the experts into RAM: peak RSS during from_pretrained stays far below expert bytes."""
from __future__ import annotations

import json
import subprocess
import sys

import torch

from tiny_models import build

PROBE = """
import json, resource, sys, torch
import offload, transformers                       # imports first: they are not part of loading
from offload import OffloadedModel
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
m = OffloadedModel.from_pretrained(sys.argv[1], cache_experts=2)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"growth": after - before, "expert_bytes": m.stats()["total_experts"] * m.stats()["expert_bytes"]}))
"""


def test_peak_rss_while_loading_is_far_below_expert_bytes(tmp_path):
    build("mixtral", tmp_path, dtype=torch.bfloat16, hidden_size=512, intermediate_size=2048, vocab_size=512,
          num_hidden_layers=4)
    out = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path)], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["expert_bytes"] > 190 * 2**20
    assert r["growth"] < 0.25 * r["expert_bytes"], f"loading grew RSS by {r['growth'] / 2**20:.0f} MiB"
