#!/usr/bin/env python
"""What always-on statistics cost: nostall with ``stats=True`` against ``stats=False``.

Question
    Does ``loader.stats`` (two clock reads, a few additions and one append per
    batch, plus a memory sampler within 0.5% of a core) stay under 1% of
    throughput on the tiny-sample dataset (about 10 microseconds per sample),
    where the loader's own per-batch work is the largest share?

Command
    .venv/bin/python benchmarks/bench_stats.py --out bench-results/bench_stats.json

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
from nostall._workloads import TinySamples


def run(dataset, stats: bool, **kw) -> float:
    with nostall.DataLoader(dataset, stats=stats, **kw) as loader:
        started = time.perf_counter()
        samples = 0
        for _ in range(3):
            for x, _y in loader:
                samples += len(x)
        return samples / (time.perf_counter() - started)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=50_000)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--out", default="bench-results/bench_stats.json")
    args = p.parse_args(argv)
    dataset = TinySamples(args.samples)
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
