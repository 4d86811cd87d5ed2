"""Cold reads of a disk store's records: buffered (page cache dropped after each read) vs O_DIRECT.

    python examples/direct_io.py [STORE_DIR] [--reads 200] [--repeats 5]

STORE_DIR defaults to a dense store of the shipped demo model, converted into a temporary directory. Each
round reads the same random sequence of records once per mode, one at a time (queue depth 1, as a demand
miss does), through `DiskStore.read_into` (pread, checksum) into an aligned slot-sized buffer. Buffered mode
drops the whole file from the page cache after each read, untimed (the kernel's readahead would otherwise
serve later reads of neighbouring records from memory); direct mode bypasses the page cache. Wall and CPU
time per read are medians over rounds; the modes alternate record by record, so drift hits both.
"""
from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from offload.store.convert import build_store
from offload.store.disk import DiskStore, aligned_buffer

DEMO = Path(__file__).resolve().parents[1] / "offload" / "demo_model"


def one_round(stores: dict[str, DiskStore], order: list, buf) -> dict[str, tuple[float, float]]:
    """{mode: (wall s/read, cpu s/read)} over `order`, modes interleaved record by record."""
    wall = dict.fromkeys(stores, 0.0)
    cpu = dict.fromkeys(stores, 0.0)
    for key in order:
        for mode, store in stores.items():
            t0, c0 = time.perf_counter(), time.process_time()
            store.read_into(key, buf)
            wall[mode] += time.perf_counter() - t0
            cpu[mode] += time.process_time() - c0
            if not store.direct:
                store.drop_cached()
    return {m: (wall[m] / len(order), cpu[m] / len(order)) for m in stores}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("store_dir", nargs="?", type=Path)
    ap.add_argument("--reads", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store_dir = args.store_dir or Path(tmp) / "demo-store"
        if args.store_dir is None:
            build_store(DEMO, store_dir, progress=False)
        stores = {"buffered, page cache dropped": DiskStore(store_dir, direct=False),
                  "O_DIRECT": DiskStore(store_dir, direct=True)}
        if not stores["O_DIRECT"].direct:
            raise SystemExit(f"{store_dir}'s filesystem has no direct I/O; nothing to compare")
        stores["buffered, page cache dropped"].drop_cached()
        keys = stores["O_DIRECT"].keys()
        nbytes = sum(stores["O_DIRECT"].extent(k)[1] for k in keys) / len(keys)
        buf = aligned_buffer(stores["O_DIRECT"].buffer_bytes)
        rng = random.Random(0)
        rounds = [one_round(stores, [rng.choice(keys) for _ in range(args.reads)], buf) for _ in range(args.repeats)]
    table = Table(title=f"cold record reads, queue depth 1: {store_dir.name}, {nbytes / 1e3:.0f} KB per record, "
                        f"{args.reads} reads x {args.repeats} rounds (medians)")
    for col in ("mode", "ms/read", "CPU ms/read", "GB/s", "vs buffered"):
        table.add_column(col, justify="left" if col == "mode" else "right")
    base = statistics.median(r["buffered, page cache dropped"][0] for r in rounds)
    for mode in stores:
        wall = statistics.median(r[mode][0] for r in rounds)
        cpu = statistics.median(r[mode][1] for r in rounds)
        table.add_row(mode, f"{1e3 * wall:.3f}", f"{1e3 * cpu:.3f}", f"{nbytes / wall / 1e9:.2f}", f"{base / wall:.2f}x")
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
