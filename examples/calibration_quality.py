"""Weight-only against calibrated (GPTQ) conversion on one model: perplexity, greedy agreement, size, time.

    python examples/calibration_quality.py [MODEL_DIR] [--calibration FILE] [--formats int4-g32,...]
                                           [--tokens 256] [--work-dir DIR]

MODEL_DIR defaults to the shipped demo model and --calibration to its calibration.txt (Richard III, from the
demo's training split; no overlap with heldout.txt). Every store is converted afresh into --work-dir (a
temporary directory by default), one thread, timed; the calibrated one first runs the calibration pass,
timed on its own (tokens/s). Quality uses offload-bench formats' helpers and definitions: perplexity on the
first 2048 held-out tokens (MODEL_DIR/heldout.txt) at the model's context, greedy agreement with bf16 over
--tokens new tokens from the held-out text's first 32 tokens; bits/param from the store's files. All
experts resident. Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from offload.bench.formats import (PROMPT_TOKENS, TEXT_TOKENS, agreement, greedy, heldout_ids, perplexity,
                                   store_size)
from offload.config import OffloadConfig
from offload.model import OffloadedModel
from offload.store import calibrate
from offload.store.convert import build_store
from offload.store.source import open_checkpoint

DEMO = Path(__file__).resolve().parents[1] / "offload" / "demo_model"
FORMATS = "int4-g32,int3-g32,int2-g32,ternary"


def quality(model: OffloadedModel, ids: torch.Tensor, window: int, ref: list[int] | None, n: int) -> dict:
    ppl, _ = perplexity(model, ids, window)
    tokens = greedy(model, ids[:, :PROMPT_TOKENS], n)
    agree, first = agreement(ref, tokens) if ref is not None else (1.0, None)
    return {"ppl": ppl, "agree": agree, "first": first, "tokens": tokens}


def arguments(doc: str, formats: str) -> argparse.ArgumentParser:
    """The options these quality scripts share (add more before parse_args)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("model_dir", nargs="?", type=Path, default=DEMO)
    ap.add_argument("--calibration", type=Path, default=DEMO / "calibration.txt")
    ap.add_argument("--formats", default=formats)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--work-dir", type=Path)
    return ap


@dataclass
class Subject:
    """The model under test: its checkpoint, expert count and parameters per expert, context window."""
    arch: object
    source: object
    top_k: int
    total: int
    params: int
    window: int

    @classmethod
    def open(cls, model_dir: Path) -> "Subject":
        torch.set_num_threads(1)
        hf, arch, source, top_k = open_checkpoint(model_dir, torch.bfloat16)
        return cls(arch, source, top_k, len(source.keys()), sum(math.prod(s.shape) for s in source.layout.specs),
                   int(hf.get_text_config().max_position_embeddings))

    def reference(self, model_dir: Path, tokens: int) -> tuple[torch.Tensor, dict]:
        """(held-out ids, bf16 quality on them): what every row is measured against."""
        with OffloadedModel.from_pretrained(model_dir, cache_experts=self.total) as ref_model:
            ids = heldout_ids(ref_model.tokenizer, model_dir / "heldout.txt", TEXT_TOKENS)
            return ids, quality(ref_model, ids, self.window, None, tokens)


def main() -> None:
    args = arguments(__doc__, FORMATS).parse_args()
    subject = Subject.open(args.model_dir)
    source, top_k, total, params, window = subject.source, subject.top_k, subject.total, subject.params, subject.window

    t0 = time.perf_counter()
    stats = calibrate.collect(source, args.calibration, torch.bfloat16, progress=False)
    pass_s = time.perf_counter() - t0
    n_tokens = sum(s["tokens"] for s in stats.values()) // (len(source.layers) * top_k)  # each token: top_k experts
    low = sum(s["tokens"] < calibrate.MIN_TOKENS for s in stats.values()) + total - len(stats)
    print(f"calibration pass: {n_tokens} tokens in {pass_s:.1f} s = {n_tokens / pass_s:.0f} tokens/s; "
          f"experts below {calibrate.MIN_TOKENS} tokens: {low} of {total}")

    ids, ref = subject.reference(args.model_dir, args.tokens)
    rows = [("bf16", "-", ref, None, 16.0)]
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or Path(tmp)
        for fmt in args.formats.split(","):
            for cal in (None, args.calibration):
                store_dir = work / f"{fmt}-{'gptq' if cal else 'weights'}"
                t0 = time.perf_counter()
                build_store(args.model_dir, store_dir, bits=fmt, progress=False,
                            calibration=str(cal) if cal else None)
                convert_s = time.perf_counter() - t0
                cfg = OffloadConfig(store="disk", store_dir=str(store_dir), bits=fmt, cache_experts=total,
                                    calibration=str(cal) if cal else None)
                with OffloadedModel.from_pretrained(args.model_dir, config=cfg) as m:
                    q = quality(m, ids, window, ref["tokens"], args.tokens)
                bits = store_size(store_dir, params)["bits_per_param"]
                rows.append((fmt, "GPTQ" if cal else "weights only", q, convert_s, bits))
    print("\n| format | quantized from | perplexity | greedy agreement (first difference) | bits/param | "
          "conversion s |\n|---|---|---:|---:|---:|---:|")
    for fmt, how, q, sec, bits in rows:
        first = "-" if q["first"] is None else q["first"]
        print(f"| {fmt} | {how} | {q['ppl']:.2f} | {q['agree']:.3f} ({first}) | {bits:.2f} | "
              f"{'-' if sec is None else f'{sec:.1f}'} |")


if __name__ == "__main__":
    main()
