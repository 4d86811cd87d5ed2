"""Every miss mode and RAM-tier size on the trained demo: greedy tokens against stock transformers (bf16) and
against the same int4 weights all resident, with the per-tier accounting checked exactly.

  python examples/tiers_identity.py [--work-dir DIR]
"""
from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM

from offload import OffloadedModel
from offload.cli.common import DEMO_MODEL

RUNS = [("100%", "cpu", "25%"), ("50%", "cpu", None), ("25%", "auto", None), ("100%", "copy", "25%"),
        ("50%", "copy", "12.5%"), ("25%", "copy", 2)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work-dir", default="tiers-identity", help="where the bf16 and int4 stores are converted")
    a = ap.parse_args()
    torch.set_num_threads(1)
    stock = AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.bfloat16, experts_implementation="eager")
    tok = OffloadedModel.from_pretrained(DEMO_MODEL).tokenizer
    ids = tok("KING RICHARD:\nNow is the winter of", return_tensors="pt").input_ids
    kw = dict(max_new_tokens=48, min_new_tokens=48, do_sample=False)
    want = stock.eval().generate(ids, **kw)
    int4 = OffloadedModel.from_pretrained(DEMO_MODEL, store_dir=f"{a.work_dir}/int4", bits="int4-g32")
    refs = {None: want, "int4-g32": int4.generate(ids, **kw)}
    print("| store | ram_memory | miss | cache_experts | tokens | device hits | RAM hits | disk reads | CPU-computed |")
    print("|---|---|---|---|---|---:|---:|---:|---:|")
    for bits, ref in refs.items():
        for ram, miss, cap in RUNS:
            m = OffloadedModel.from_pretrained(DEMO_MODEL, store_dir=f"{a.work_dir}/{bits or 'bf16'}", bits=bits,
                                               ram_memory=ram, miss=miss, cache_experts=cap)
            got = m.generate(ids, **kw)
            t = m.stats()["tiers"]
            uses = (got.shape[1] - 1) * len(m.engine.moe_layers) * m.engine.top_k
            assert t["device_hits"] + t["ram_hits"] + t["disk_reads"] == uses
            print(f"| {bits or 'bf16'} | {ram} | {miss} | {cap or '-'} | "
                  f"{'identical' if torch.equal(got, ref) else 'DIFFERENT'} | {t['device_hits']} | {t['ram_hits']} | "
                  f"{t['disk_reads']} | {t['cpu_experts']} |")
            m.close()


if __name__ == "__main__":
    main()
