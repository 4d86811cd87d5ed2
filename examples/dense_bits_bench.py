"""dense_bits benchmark: demo quality + decode, 0.8B Mixtral decode, peak RSS (see docs/benchmarks/dense-bits.md)."""
import json, statistics, sys

import torch
from offload import OffloadedModel
from offload.bench.common import measure_decode
from offload.bench.formats import agreement, greedy, heldout_ids, perplexity
from offload.cli.common import DEMO_MODEL

torch.set_num_threads(1)
out = {}
WIDTHS = (None, 8, 4)
part = sys.argv[1]

def decode(models, ids, n, rounds):
    for m in models.values():
        measure_decode(m, ids, 2, cold=False)   # warm: every expert resident
    s = {k: [] for k in models}
    for _ in range(rounds):
        for k, m in models.items():
            s[k].append(measure_decode(m, ids, n, cold=False)["tok_s"])
    return {str(k): statistics.median(v) for k, v in s.items()}, {str(k): v for k, v in s.items()}

if part == "demo":
    models = {b: OffloadedModel.from_pretrained(DEMO_MODEL, store="disk", store_dir="/tmp/dbench/demo-store",
                                                bits="int4-g32", dense_bits=b, cache_experts=64) for b in WIDTHS}
    tok = models[None].tokenizer
    ids = heldout_ids(tok, DEMO_MODEL / "heldout.txt", 4096)
    ref_prompts = [ids[:, i * 512:i * 512 + 32] for i in range(8)]
    q = {}
    refs = [greedy(models[None], p, 64) for p in ref_prompts]
    for b, m in models.items():
        with torch.inference_mode():
            ppl, n = perplexity(m, ids, 512)
        gots = [greedy(m, p, 64) for p in ref_prompts]
        ag = [agreement(r, g) for r, g in zip(refs, gots)]
        q[str(b)] = {"ppl": ppl, "tokens": n, "agreement": statistics.mean(a for a, _ in ag),
                     "first_divergence": [f for _, f in ag], "non_expert_mib": m.plan.non_expert_bytes / 2**20}
    out["demo_quality"] = q
    out["demo_decode"], out["demo_decode_samples"] = decode(models, ids[:, :32], 32, 9)
elif part == "big":
    path = "/tmp/dbench/mixtral08"
    models = {b: OffloadedModel.from_pretrained(path, store="disk", store_dir="/tmp/dbench/m08-store",
                                                bits="int4-g128", dense_bits=b, cache_experts=64) for b in WIDTHS}
    for b, m in models.items():
        out.setdefault("big_non_expert_mib", {})[str(b)] = m.plan.non_expert_bytes / 2**20
    ids = torch.randint(3, 31000, (1, 32), generator=torch.Generator().manual_seed(0))
    out["big_decode"], out["big_decode_samples"] = decode(models, ids, 16, 7)
print(json.dumps(out, indent=1))
