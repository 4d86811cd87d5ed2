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
from offload.store.convert import build_store

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

MIB = 2**20


def build_big(path, intermediate: int):
    """4 layers x 8 experts of 512 x `intermediate` at bf16: 192 MiB of experts per 2048 of intermediate size."""
    return build("mixtral", path, dtype=torch.bfloat16, hidden_size=512, intermediate_size=intermediate,
                 vocab_size=512, num_hidden_layers=4)


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    return build_big(tmp_path_factory.mktemp("big"), 4096)  # 384 MiB of experts


def probe(*args) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_loading_peak_rss_does_not_grow_with_expert_bytes(big, tmp_path):
    """transformers' loader costs ~100-150 MiB whatever the model; the experts must add nothing to it."""
    small = probe(build_big(tmp_path / "small", 1024), "load")   # 96 MiB of experts
    large = probe(big, "load")                                     # 384 MiB of experts
    assert large["expert_bytes"] == 4 * small["expert_bytes"] == 384 * MIB
    extra = large["growth"] - small["growth"]
    assert extra < 0.1 * (large["expert_bytes"] - small["expert_bytes"]), (
        f"4x the experts grew loading's peak RSS by {extra / MIB:.0f} MiB more")
    assert large["growth"] < 0.5 * large["expert_bytes"], f"loading grew peak RSS by {large['growth'] / MIB:.0f} MiB"


def test_conversion_peak_rss_is_a_few_experts(big, tmp_path):
    r = probe(big, "convert", tmp_path / "store")
    one_expert = 384 * MIB // 32
    assert r["growth"] < 8 * one_expert, f"converting grew peak RSS by {r['growth'] / MIB:.0f} MiB"
