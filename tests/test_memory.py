"""Neither loading nor converting pulls the experts into memory: the process's own peak RSS stays far below
the expert bytes. Measured with the kernel's high-water mark (VmHWM), reset in the child after imports —
ru_maxrss would inherit the parent's (pytest's) peak across fork and exec and always read 0 growth."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tiny_models import build

PROBE = """
import json, sys, torch
import offload, transformers                        # imports are not part of the measurement
from offload import OffloadedModel
from offload.convert import build_store

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

open("/proc/self/clear_refs", "w").write("5")     # reset the high-water mark to the current RSS
before = hwm()
if sys.argv[2] == "load":
    m = OffloadedModel.from_pretrained(sys.argv[1], cache_experts=2)
    experts = m.stats()["total_experts"] * m.stats()["expert_bytes"]
else:
    build_store(sys.argv[1], sys.argv[3], bits=8, progress=False)
    experts = None
print(json.dumps({"growth": hwm() - before, "expert_bytes": experts}))
"""

EXPERT_BYTES = 4 * 8 * 3 * 512 * 4096 * 2  # 4 layers x 8 experts x (gate, up, down) at bf16: 384 MiB


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    path = tmp_path_factory.mktemp("big")
    return build("mixtral", path, dtype=torch.bfloat16, hidden_size=512, intermediate_size=4096, vocab_size=512,
                 num_hidden_layers=4)


def probe(*args) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_loading_peak_rss_far_below_expert_bytes(big):
    r = probe(big, "load")
    assert r["expert_bytes"] == EXPERT_BYTES
    # transformers' loader itself costs ~100 MiB whatever the expert size (measured: the same with 2x experts)
    assert r["growth"] < 0.35 * EXPERT_BYTES, f"loading grew peak RSS by {r['growth'] / 2**20:.0f} MiB"


def test_conversion_peak_rss_is_a_few_experts(big, tmp_path):
    r = probe(big, "convert", tmp_path / "store")
    one_expert = EXPERT_BYTES // 32
    assert r["growth"] < 8 * one_expert, f"converting grew peak RSS by {r['growth'] / 2**20:.0f} MiB"
