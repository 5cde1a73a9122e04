#!/usr/bin/env python
"""Restore time: nostall's load_state_dict against torchdata's StatefulDataLoader.

Question
    After a preemption, how long does a loader take to continue from a state
    saved in the middle and at the end of a 100,000-sample epoch, and does it
    continue with the right batch?

Command
    .venv/bin/python benchmarks/bench_resume.py --out bench-results/bench_resume.json

Method
    A map-style dataset of 100,000 small samples (each returns its index),
    batch 32, shuffled with a seeded generator, 2 workers (fork). For each loader
    and position (50% and 99% of the epoch): iterate to the position, take
    ``state_dict()``, build a new loader, ``load_state_dict(state)``, and time
    from there to the first batch after the position (restore + iter + first
    batch); check that batch against an uninterrupted run. Every measurement in
    this one process, alternating loaders, median of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset

import nostall


class Numbers(Dataset):
    """``ds[i] == i``: the samples cost nothing, so restore time is the loader's own."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def make(kind: str, dataset, workers: int):
    gen = torch.Generator().manual_seed(0)
    kw = dict(batch_size=32, shuffle=True, num_workers=workers, generator=gen)
    if kind == "nostall":
        return nostall.DataLoader(dataset, **kw)
    from torchdata.stateful_dataloader import StatefulDataLoader

    return StatefulDataLoader(dataset, persistent_workers=workers > 0, **kw)


def close(loader) -> None:
    if hasattr(loader, "close"):
        loader.close()
    else:
        it = getattr(loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()


def restore_seconds(kind: str, dataset, workers: int, position: int, expected) -> float:
    loader = make(kind, dataset, workers)
    it = iter(loader)
    for _ in range(position):
        next(it)
    state = loader.state_dict()
    close(loader)
    del it, loader
    started = time.perf_counter()
    again = make(kind, dataset, workers)
    again.load_state_dict(state)
    batch = next(iter(again))
    took = time.perf_counter() - started
    assert torch.equal(batch, expected), f"{kind}: wrong batch after restoring at {position}"
    close(again)
    return took


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=100_000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out", default="bench-results/bench_resume.json")
    args = p.parse_args(argv)
    dataset = Numbers(args.samples)
    uninterrupted = {}
    for kind in ("nostall", "StatefulDataLoader"):  # each against its own uninterrupted run
        reference = make(kind, dataset, args.workers)
        uninterrupted[kind] = list(reference)
        close(reference)
    n = len(uninterrupted["nostall"])
    rows = []
    for label, position in (("middle", n // 2), ("end", n - 2)):
        times = {"nostall": [], "StatefulDataLoader": []}
        for _ in range(args.repeat):
            for kind in times:
                times[kind].append(restore_seconds(kind, dataset, args.workers, position,
                                                   uninterrupted[kind][position]))
        row = {"position": label, "batch": position, **{k: statistics.median(v) for k, v in times.items()}}
        rows.append(row)
        print(f"{label}: " + ", ".join(f"{k} {v:.3f} s" for k, v in row.items() if k in times), file=sys.stderr)
    print(f"{args.samples:,} samples, batch 32, {args.workers} workers, median of {args.repeat}")
    print()
    print("| position in the epoch | nostall (s) | StatefulDataLoader (s) | nostall / StatefulDataLoader |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['position']} (batch {r['batch']} of {n}) | {r['nostall']:.3f} | "
              f"{r['StatefulDataLoader']:.3f} | {r['nostall'] / r['StatefulDataLoader']:.2f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join(["benchmarks/bench_resume.py", *(argv or sys.argv[1:])]),
                               "samples": args.samples, "workers": args.workers, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
