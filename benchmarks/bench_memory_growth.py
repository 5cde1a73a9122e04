#!/usr/bin/env python
"""Memory over a long run: what the main process keeps per batch and per epoch.

Question
    Does the loader's own memory in the main process stay bounded however many
    batches and epochs it delivers, with ``stats=True`` (the default: the trace
    keeps the latest batches) and ``stats=False`` (nothing kept per batch)? And
    with ``in_order=False``, whose resume ledger lists the batches delivered?
    (Separate from bench_memory.py, which measures the process tree's PSS for
    copy-on-read datasets in subprocesses: this one counts the Python objects
    nostall itself keeps, with tracemalloc, in this process.)

Command
    .venv/bin/python benchmarks/bench_memory_growth.py --out bench-results/bench_memory_growth.json

Method
    A dataset of 1,000 integers (``ds[i] == i``), batch_size=1, 2 workers,
    persistent workers, so 100,000 batches are 100 epochs (``--batches``); the
    in_order=False row uses one epoch of all the batches (its ledger is per
    epoch). tracemalloc traces every allocation (1 frame); at every ``--every``
    batches the bytes still held by allocations made in nostall's modules are
    summed. Figures: bytes held at each checkpoint, and growth per 10,000
    batches over the first half and the second half of the run. Run the same
    command on two commits to compare them.

Output
    A markdown table on stdout and every figure as JSON in ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import tracemalloc
from pathlib import Path

from torch.utils.data import Dataset

import nostall


class Integers(Dataset):
    """``ds[i] == i``: the cheapest sample, so the loader's own cost is all there is."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def held_bytes(keep: list) -> int:
    """Bytes held now by allocations made in nostall's modules."""
    gc.collect()
    return sum(s.size for s in tracemalloc.take_snapshot().filter_traces(keep).statistics("filename"))


def measure(batches: int, every: int, samples: int, **kw) -> dict:
    """Iterate ``batches`` batches of a fresh loader, recording bytes held every ``every``."""
    keep = [tracemalloc.Filter(True, os.path.join(os.path.dirname(nostall.__file__), "*"))]
    loader = nostall.DataLoader(Integers(samples), batch_size=1, num_workers=2, **kw)
    tracemalloc.start(1)
    started, n, held = time.perf_counter(), 0, {}
    try:
        while n < batches:
            for _ in loader:
                n += 1
                if n % every == 0:
                    held[n] = held_bytes(keep)
                    if n >= batches:
                        break
    finally:
        tracemalloc.stop()
        loader.close()
    half = max(k for k in held if k <= batches // 2)
    first = min(held)
    return {"held": held, "seconds": time.perf_counter() - started,
            "growth_first_half_per_10k": (held[half] - held[first]) / max(1, half - first) * 10_000,
            "growth_second_half_per_10k": (held[batches] - held[half]) / max(1, batches - half) * 10_000}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, default=100_000)
    p.add_argument("--every", type=int, default=10_000)
    p.add_argument("--types", nargs="+", default=["thread", "process"], choices=["thread", "process"])
    p.add_argument("--out", default="bench-results/bench_memory_growth.json")
    args = p.parse_args(argv)
    print(f"nostall from {os.path.dirname(nostall.__file__)}", file=sys.stderr)
    configs = [dict(worker_type=t, stats=s, persistent_workers=True) for t in args.types for s in (False, True)]
    configs.append(dict(worker_type=args.types[0], stats=False, in_order=False))
    rows = []
    for kw in configs:
        samples = args.batches if kw.get("in_order") is False else 1_000
        row = dict(kw, samples=samples, **measure(args.batches, args.every, samples, **kw))
        rows.append(row)
        print(f"{kw}: {row['growth_first_half_per_10k'] / 1024:,.1f} / {row['growth_second_half_per_10k'] / 1024:,.1f} "
              f"KB per 10,000 batches; held at the end {row['held'][args.batches] / 2**20:.2f} MB "
              f"[{row['seconds']:.0f} s]", file=sys.stderr)
    print(f"| workers | stats | in_order | KB held at {args.every:,} | MB held at {args.batches:,} | "
          "KB per 10,000 batches (first half) | KB per 10,000 batches (second half) |")
    print("|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['worker_type']} | {r['stats']} | {r.get('in_order', True)} | {r['held'][args.every] / 1024:,.0f} | "
              f"{r['held'][args.batches] / 2**20:.2f} | {r['growth_first_half_per_10k'] / 1024:,.1f} | "
              f"{r['growth_second_half_per_10k'] / 1024:,.1f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join(["python benchmarks/bench_memory_growth.py", *(argv or sys.argv[1:])]),
                               "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
