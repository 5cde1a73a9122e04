#!/usr/bin/env python
"""num_workers="auto" against a sweep of fixed worker counts.

Question
    Does ``num_workers="auto"`` reach the throughput of the best fixed
    ``num_workers``, how fast does it settle, and when the training step is the
    bottleneck does it use the fewest workers that keep up?

Command
    .venv/bin/python benchmarks/bench_auto.py --out bench-results/bench_auto.json

Method
    Workloads: latency-bound (each sample waits 10 ms), SpotGEO-like frames
    (PNG decode), pure-Python CPU work holding the GIL (~0.3 ms a sample), and
    tiny samples (~10 us); each with no training step and with a 30 ms CPU step.
    The sweep: nostall with num_workers 0, 1, 2, 4, 8, 16, 32 (prefetch 2,
    process workers), each measured for ``--seconds`` after its first batch.
    "auto": one loader run for ``--auto-seconds``; its rate is measured over the
    last ``--seconds``, its settling time is when the tuner last changed. All in
    this process, one after the other. This is a reduced form of the issue's
    sweep (no prefetch or worker-type axes).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from torch.utils.data import Dataset

import nostall
from nostall._measure import _make_step
from nostall._stats import batch_len
from nostall._workloads import RemoteReads, TinySamples, WORKLOADS


class PythonWork(Dataset):
    """Pure-Python arithmetic holding the GIL, about 0.3 ms per sample."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        x = i
        for k in range(3000):
            x = (x * 31 + k) % 1_000_003
        return x


def build(name: str):
    if name == "latency":
        return RemoteReads(4000), 32
    if name == "spotgeo":
        return WORKLOADS["spotgeo"].build(1280), 32
    if name == "python":
        return PythonWork(20_000), 32
    return TinySamples(400_000), 256


def run(dataset, batch_size: int, num_workers, seconds: float, step_ms: float, window_s: float):
    """Iterate for ``seconds`` after the first batch; the rate over the last ``window_s``."""
    step = _make_step(step_ms)
    loader = nostall.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=num_workers)
    marks = []
    started = None
    try:
        while True:
            for batch in loader:
                now = time.perf_counter()
                if started is None:
                    started = now
                marks.append((now, batch_len(batch)))
                if step is not None:
                    step()
                if now - started >= seconds:
                    break
            else:
                continue
            break
        tuner = loader.stats.tuner
        engine_tuner = loader._engine.tuner if loader._engine is not None else None
        chosen = engine_tuner.workers if engine_tuner is not None else num_workers
    finally:
        loader.close()
    end = marks[-1][0]
    recent = [(t, n) for t, n in marks if t >= end - window_s]
    rate = sum(n for _, n in recent[1:]) / max(recent[-1][0] - recent[0][0], 1e-9)
    settled = tuner[-1]["at_s"] if tuner else 0.0
    return rate, settled, chosen, tuner


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", nargs="+", default=["latency", "spotgeo", "python", "tiny"])
    p.add_argument("--steps", type=float, nargs="+", default=[0.0, 30.0])
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2, 4, 8, 16, 32])
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--auto-seconds", type=float, default=14.0)
    p.add_argument("--out", default="bench-results/bench_auto.json")
    args = p.parse_args(argv)
    rows = []
    for name in args.workloads:
        dataset, batch_size = build(name)
        for step_ms in args.steps:
            sweep = {}
            for nw in args.workers:
                rate, *_ = run(dataset, batch_size, nw, args.seconds, step_ms, args.seconds)
                sweep[nw] = rate
                print(f"{name} step {step_ms:g} ms, {nw} workers: {rate:,.0f} samples/s", file=sys.stderr)
            rate, settled, workers, tuner = run(dataset, batch_size, "auto", args.auto_seconds, step_ms,
                                                args.seconds)
            best = max(sweep.values())
            fewest = min(nw for nw, r in sweep.items() if r >= 0.98 * best)
            rows.append(dict(workload=name, step_ms=step_ms, sweep=sweep, best=best, fewest_within_2pct=fewest,
                             auto_rate=rate, auto_workers=workers, settled_s=settled, tuner=tuner))
            print(f"{name} step {step_ms:g} ms, auto: {rate:,.0f} samples/s with {workers} workers "
                  f"(settled at {settled:.1f} s); best fixed {best:,.0f}", file=sys.stderr)
    print("| workload | step (ms) | best fixed (samples/s) | fewest workers within 2% | auto (samples/s) | "
          "auto / best | auto's workers | settled after (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['workload']} | {r['step_ms']:g} | {r['best']:,.0f} | {r['fewest_within_2pct']} | "
              f"{r['auto_rate']:,.0f} | {r['auto_rate'] / r['best']:.2f} | {r['auto_workers']} | "
              f"{r['settled_s']:.1f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join(["benchmarks/bench_auto.py", *(argv or sys.argv[1:])]),
                               "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
