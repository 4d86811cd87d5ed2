"""The RAM tier on a CPU: decode with experts computed in place from RAM records, against every expert resident,
and with part of the experts on disk (prefetched or not), all loaded at once and measured alternately.

  python examples/ram_tier.py MODEL_DIR --store-dir DIR --bits int4-g32 [--tokens 32] [--repeats 5]

Rows (one converted store, O_DIRECT reads, so the page cache never holds experts):
  all resident            cache_experts=100%: the reference
  RAM 100%, device 25%    miss=cpu: on a CPU the device tier and the RAM tier are one pool, computed in place
  RAM 100%, device 25%    miss=copy: a separate 25% slot pool filled by copies out of RAM (what the in-place
                          path saves)
  RAM 50% / 25%           the rest read from disk on demand, and with the gate predictor prefetching disk -> RAM
Decode tok/s is N / (t(N+1 new) - t(1 new)) from a warm state (each configuration's tiers as the previous run
left them), median of --repeats rounds, the round order rotating. Per token: uses served by each tier, bytes
per link, stall.
"""
from __future__ import annotations

import argparse
import statistics

import torch

from offload import OffloadedModel
from offload.bench.common import loader_for, measure_decode, prompt_ids


def configs(store_dir: str, bits: str | None) -> list[tuple[str, dict]]:
    base = {"store_dir": store_dir, "bits": bits}
    return [
        ("all resident", {**base, "cache_experts": "100%"}),
        ("RAM 100%, device 25%, miss=cpu", {**base, "cache_experts": "25%", "ram_memory": "100%", "miss": "cpu"}),
        ("RAM 100%, device 25%, miss=copy", {**base, "cache_experts": "25%", "ram_memory": "100%", "miss": "copy"}),
        ("RAM 50%, demand", {**base, "ram_memory": "50%"}),
        ("RAM 50%, gate prefetch", {**base, "ram_memory": "50%", "predictor": "gate"}),
        ("RAM 25%, demand", {**base, "ram_memory": "25%"}),
        ("RAM 25%, gate prefetch", {**base, "ram_memory": "25%", "predictor": "gate"}),
    ]


def per_token(model: OffloadedModel, run) -> dict:
    """Tier counts and link bytes of the last timed run (the N+1-token generate), per token."""
    s = model.stats()
    n = max(1, s["tokens"])
    out = {k: v / n for k, v in s["tiers"].items()}
    out.update({f"{name} KiB": v["bytes"] / n / 1024 for name, v in s["links"].items()})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("--store-dir", required=True)
    ap.add_argument("--bits", default="int4-g32")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rows = [(name, OffloadedModel.from_pretrained(a.model_dir, **o)) for name, o in configs(a.store_dir, a.bits)]
    models = [m for _, m in rows]
    ids = prompt_ids(models[0], None, 32)
    samples: dict[str, list[dict]] = {name: [] for name, _ in rows}
    tiers: dict[str, dict] = {}
    for name, m in rows:  # warm-up: fills each configuration's tiers as decoding leaves them
        loader_for(models, m)
        measure_decode(m, ids, a.tokens, cold=False)
    for r in range(a.repeats):
        for name, m in rows[r % len(rows):] + rows[: r % len(rows)]:
            loader_for(models, m)
            samples[name].append(measure_decode(m, ids, a.tokens, cold=False))
            tiers[name] = per_token(m, None)
    base = statistics.median(x["tok_s"] for x in samples["all resident"])
    print(f"| configuration | tok/s | vs all resident | device hits | RAM hits | disk reads | CPU-computed "
          f"| KiB/token per link | stall ms/token |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, m in rows:
        tok_s = statistics.median(x["tok_s"] for x in samples[name])
        stall = statistics.median(x["stall_ms_per_token"] for x in samples[name])
        t = tiers[name]
        links = ", ".join(f"{k.removesuffix(' KiB')} {v:.0f}" for k, v in t.items() if k.endswith("KiB"))
        reads = t.get("disk_reads", 0.0)
        print(f"| {name} | {tok_s:.1f} | {tok_s / base:.2f}x | {t['device_hits']:.1f} | {t['ram_hits']:.1f} | "
              f"{reads:.1f} | {t['cpu_experts']:.1f} | {links} | {stall:.2f} |")
    for m in models:
        m.close()


if __name__ == "__main__":
    main()
