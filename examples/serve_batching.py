"""What batching buys offload-serve: aggregate tokens/s and expert bytes moved per generated token with
1, 4 and 8 concurrent streams, decoded together in one batch vs served one after another.

    python examples/serve_batching.py [MODEL_DIR] [--cache-experts N] [--tokens 32] [--repeats 3] [--threads 1]

Drives offload-serve's engine thread (Server + Batcher) directly, without HTTP, so the numbers are the
engine's. Each run starts with a cold expert cache; the table shows medians over the repeats.
"""
from __future__ import annotations

import argparse
import statistics
import threading
import time
from pathlib import Path

import torch

from offload import OffloadedModel
from offload.serve.sequence import Event, SamplingParams
from offload.serve.server import Server

DEMO = Path(__file__).resolve().parents[1] / "offload" / "demo_model"
PROMPTS = ["Once upon a time", "The king said to his son", "In the morning the village", "She opened the door and",
           "Why do the stars", "My lord, the army", "A letter came from", "Tell me, good friend,"]


def run(server: Server, prompts: list[list[int]], tokens: int, together: bool) -> tuple[float, float]:
    """(tokens/s, expert bytes loaded per generated token) for one cold run over `prompts`."""
    model = server.model
    model.reset_cache()
    params = SamplingParams(max_tokens=tokens, temperature=0.0)
    made: list[int] = []
    t0 = time.perf_counter()
    batches = [prompts] if together else [[p] for p in prompts]
    for batch in batches:
        done = threading.Semaphore(0)

        def emit(ev: Event) -> None:
            if ev.finish_reason or ev.error:
                made.append(ev.completion_tokens)
                done.release()

        for ids in batch:
            server.batcher.submit(server.sequence(ids, params, emit))
        for _ in batch:
            done.acquire()
    seconds = time.perf_counter() - t0
    moved = sum(server.batcher.model_stats()["bytes_loaded"].values())
    return sum(made) / seconds, moved / sum(made)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", nargs="?", default=str(DEMO))
    ap.add_argument("--cache-experts", type=int, default=16, help="resident expert slots (demo: 16 of 64 = 25%%)")
    ap.add_argument("--tokens", type=int, default=32, help="max tokens per stream")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = OffloadedModel.from_pretrained(args.model_dir, cache_experts=args.cache_experts, store="ram",
                                           dtype=args.dtype)
    server = Server(model, "bench", max_batch=8, max_queue=64)
    server.start()
    tok = model.tokenizer
    print(f"{args.model_dir}: {model.stats()['capacity_experts']} of {model.stats()['total_experts']} experts "
          f"resident, store=ram, {args.dtype}, {args.threads} thread(s), {args.tokens} tokens per stream, "
          f"median of {args.repeats}")
    print("| streams | one after another tok/s | batched tok/s | speed-up | one after another KiB/token "
          "| batched KiB/token |")
    print("|---:|---:|---:|---:|---:|---:|")
    try:
        run(server, [tok(PROMPTS[0])["input_ids"]], args.tokens, True)  # warm-up: first-call costs stay out
        for streams in (1, 4, 8):
            prompts = [tok(p)["input_ids"] for p in PROMPTS[:streams]]
            rows: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
            for _ in range(args.repeats):  # alternate the modes, so a drift in machine load hits both alike
                for mode in (False, True):
                    rows[mode].append(run(server, prompts, args.tokens, mode))
            (seq_rate, seq_bytes), (bat_rate, bat_bytes) = (
                (statistics.median(r for r, _ in rows[m]), statistics.median(b for _, b in rows[m]))
                for m in (False, True))
            print(f"| {streams} | {seq_rate:.1f} | {bat_rate:.1f} | {bat_rate / seq_rate:.2f}x "
                  f"| {seq_bytes / 1024:.0f} | {bat_bytes / 1024:.0f} |")
    finally:
        server.close()


if __name__ == "__main__":
    main()
