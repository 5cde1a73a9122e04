#!/usr/bin/env python
"""What always-on statistics cost: nostall with ``stats=True`` against ``stats=False``.

Question
    Does ``loader.stats`` (two clock reads, a few additions and one append per
    batch, plus a memory sampler within 0.5% of a core) stay under 1% of
    throughput on the tiny-sample dataset (about 10 microseconds per sample),
    where the loader's own per-batch work is the largest share?

Command
    .venv/bin/python benchmarks/bench_stats.py --out bench-results/bench_stats.json

    ``--mode profiler``: what naming each ``next()`` for torch.profiler costs when no
    profiler runs (one ``torch.autograd._profiler_enabled()`` read per batch): the
    epoch iterators' ``__next__`` as shipped against the same without the check,
    batch size 1 (the most batches per sample), stats on and off.

Method
    TinySamples; for each configuration (num_workers, batch size) the two
    variants run alternately, ``--repeat`` times each, in this one process
    (same warm caches for both); each run is 3 epochs; the figure is the median
    samples/s. The ratio with/without is what counts: it is measured side by
    side, so the machine's drift cancels.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import nostall
from nostall.cli._workloads import TinySamples


def run(dataset, stats: bool, **kw) -> float:
    with nostall.DataLoader(dataset, stats=stats, **kw) as loader:
        started = time.perf_counter()
        samples = 0
        for _ in range(3):
            for x, _y in loader:
                samples += len(x)
        return samples / (time.perf_counter() - started)


def _without_profiler_check():
    """Swap in the iterators' ``__next__`` without the profiler check; returns an undo."""
    from nostall.core import _loader
    from nostall.observe._stats import MeasuredIterator

    saved = _loader._EpochIterator.__next__, _loader._MeasuredLoaderIter.__next__
    _loader._EpochIterator.__next__ = lambda self: self._next()
    _loader._MeasuredLoaderIter.__next__ = MeasuredIterator.__next__

    def undo():
        _loader._EpochIterator.__next__, _loader._MeasuredLoaderIter.__next__ = saved
    return undo


def profiler_mode(dataset, repeat: int) -> list[dict]:
    """Samples/s with and without the profiler check, batch size 1, no profiler running."""
    rows = []
    for stats in (False, True):
        for workers in (0, 2):
            kw = dict(num_workers=workers, batch_size=1)
            checked, plain = [], []
            for _ in range(repeat):
                checked.append(run(dataset, stats, **kw))
                undo = _without_profiler_check()
                try:
                    plain.append(run(dataset, stats, **kw))
                finally:
                    undo()
            row = dict(kw, stats=stats, checked=statistics.median(checked), plain=statistics.median(plain),
                       spread=(max(plain) - min(plain)) / statistics.median(plain))
            row["ratio"] = row["checked"] / row["plain"]
            rows.append(row)
            print(f"stats={stats} num_workers={workers} batch_size=1: with check {row['checked']:.0f} samples/s, "
                  f"without {row['plain']:.0f}, ratio {row['ratio']:.3f} (spread of 'without' "
                  f"{row['spread']:.1%})", file=sys.stderr, flush=True)
    print("| stats | num_workers | samples/s, with check | samples/s, without | ratio | spread without |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['stats']} | {r['num_workers']} | {r['checked']:.0f} | {r['plain']:.0f} | "
              f"{r['ratio']:.3f} | {r['spread']:.1%} |")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=50_000)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--out", default="bench-results/bench_stats.json")
    p.add_argument("--mode", choices=["stats", "profiler"], default="stats",
                   help="stats: stats on vs off; profiler: the torch.profiler check vs none")
    args = p.parse_args(argv)
    dataset = TinySamples(args.samples)
    if args.mode == "profiler":
        rows = profiler_mode(dataset, args.repeat)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"command": " ".join(["benchmarks/bench_stats.py", *(argv or sys.argv[1:])]),
                                   "samples": args.samples, "repeat": args.repeat, "rows": rows}, indent=2) + "\n")
        return 0
    configs = [dict(num_workers=0, batch_size=256), dict(num_workers=2, batch_size=256),
               dict(num_workers=0, batch_size=32), dict(num_workers=2, batch_size=32)]
    rows = []
    for kw in configs:
        on, off = [], []
        for _ in range(args.repeat):
            off.append(run(dataset, False, **kw))
            on.append(run(dataset, True, **kw))
        row = dict(kw, stats_on=statistics.median(on), stats_off=statistics.median(off))
        row["ratio"] = row["stats_on"] / row["stats_off"]
        rows.append(row)
        print(f"num_workers={kw['num_workers']} batch_size={kw['batch_size']}: "
              f"stats on {row['stats_on']:.0f} samples/s, off {row['stats_off']:.0f}, "
              f"ratio {row['ratio']:.3f}", file=sys.stderr, flush=True)
    print("| num_workers | batch size | samples/s, stats on | samples/s, stats off | on / off |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['num_workers']} | {r['batch_size']} | {r['stats_on']:.0f} | {r['stats_off']:.0f} | {r['ratio']:.3f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join(["benchmarks/bench_stats.py", *(argv or sys.argv[1:])]),
                               "samples": args.samples, "repeat": args.repeat, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
