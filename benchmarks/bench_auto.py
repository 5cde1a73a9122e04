#!/usr/bin/env python
"""num_workers="auto" against an exhaustive sweep of fixed configurations.

Question
    Does ``num_workers="auto"`` reach the throughput of the best fixed
    configuration, how fast does it settle (also after the samples get twice as
    costly mid-run), and when the training step is the bottleneck does it use the
    fewest workers that keep up?

Command
    .venv/bin/python benchmarks/bench_auto.py --out bench-results/bench_auto.json

Method
    Workloads: latency-bound (each sample waits 10 ms), SpotGEO-like frames (PNG
    decode), pure-Python CPU work holding the GIL (~0.3 ms a sample), and tiny
    samples (~10 us); each with no training step and with a 30 ms training step of
    fixed CPU work on one core (matmuls with one intra-op thread, calibrated on an
    idle core before anything runs).
    1. Sweep: num_workers 0, 1, 2, 4, 8, 16, 32 x prefetch_factor 1, 2, 4 x worker
       type process / thread, each measured once for ``--seconds``, from when
       the batches in flight at the start (num_workers x prefetch_factor, made
       before the loop ran) were consumed and 0.5 s after its first batch.
    2. Final: the three best sweep configurations, the fewest-workers one within
       2% of the best, and "auto" (``num_workers="auto", worker_type="auto"``,
       prefetch 2; run ``--auto-seconds``, measured over its last
       ``--seconds``; "settled" is the tuner's last change), interleaved and
       repeated ``--repeat`` times; medians. The best of many single noisy
       measurements overstates the best, so ratios use the final medians.
    3. Cost doubling: the latency workload with the step, whose samples wait
       20 ms instead of 10 from ``--switch-s`` seconds on; "auto" runs
       ``--switch-s`` + ``--auto-seconds``; the time from the switch to the
       tuner's last change, and the rate over the last ``--seconds`` against
       fixed configurations at 20 ms.
    All in this process, one after the other.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset

import nostall
from nostall.observe._stats import batch_len
from nostall.cli._workloads import WORKLOADS, RemoteReads, TinySamples


@functools.lru_cache(maxsize=None)
def _matmuls_per_ms() -> float:
    """Calibrated once, before any loader runs: 64x64 matmuls per millisecond."""
    a, b = torch.randn(64, 64), torch.randn(64, 64)
    rates = []
    for _ in range(5):
        began, n = time.perf_counter(), 0
        while time.perf_counter() - began < 0.05:
            torch.mm(a, b)
            n += 1
        rates.append(n / ((time.perf_counter() - began) * 1000))
    return max(rates)  # the least disturbed window


def make_step(step_ms: float):
    """A training step of fixed work: the matmuls an idle core does in ``step_ms``.
    Workers that take CPU from the loop make it slower, as they would a real step."""
    if step_ms <= 0:
        return None
    a, b = torch.randn(64, 64), torch.randn(64, 64)
    count = max(1, round(_matmuls_per_ms() * step_ms))

    def step() -> None:
        for _ in range(count):
            torch.mm(a, b)

    return step


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


class SlowingReads(RemoteReads):
    """RemoteReads whose wait doubles from the wall-clock time ``switch_at`` on
    (the same moment in every worker process)."""

    def __init__(self, n: int, delay_s: float, switch_at: float) -> None:
        super().__init__(n, delay_s)
        self.switch_at = switch_at

    def _make(self, index: int):
        if time.time() >= self.switch_at:
            time.sleep(self.delay_s)  # a second wait: twice the cost
        return super()._make(index)


def build(name: str):
    if name == "latency":
        return RemoteReads(4000), 32
    if name == "spotgeo":
        return WORKLOADS["spotgeo"].build(1280), 32
    if name == "python":
        return PythonWork(20_000), 32
    return TinySamples(400_000), 256


def run(dataset, batch_size: int, config: tuple, seconds: float, step_ms: float, warmup_s: float = 0.5):
    """The loop's rate over ``seconds``, measured once ``warmup_s`` have passed since
    the first batch and the batches in flight at the start (num_workers x prefetch)
    were consumed: those were made while the loop was not yet running, and counting
    them would credit a large window with a burst it cannot sustain."""
    num_workers, prefetch, kind = config
    step = make_step(step_ms)
    kw = {} if num_workers == 0 else dict(prefetch_factor=prefetch, worker_type=kind)
    loader = nostall.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=num_workers, **kw)
    burst = num_workers * prefetch if isinstance(num_workers, int) and num_workers else 0
    marks, first, begin = [], None, None
    try:
        while begin is None or marks[-1][0] - begin < seconds:
            for batch in loader:
                now = time.perf_counter()
                first = first or now
                if begin is None and now - first >= warmup_s and len(marks) >= burst:
                    begin = now
                marks.append((now, batch_len(batch)))
                if step is not None:
                    step()
                if begin is not None and now - begin >= seconds:
                    break
        tuner = loader.stats.tuner
        engine_tuner = loader._engine.tuner if loader._engine is not None else None
        chosen = engine_tuner.workers if engine_tuner is not None else num_workers
    finally:
        loader.close()
    measured = [(t, n) for t, n in marks if t >= begin]
    rate = sum(n for _, n in measured[1:]) / max(measured[-1][0] - measured[0][0], 1e-9)
    settled = tuner[-1]["at_s"] if tuner else 0.0
    kinds = [d["worker_type"] for d in tuner or [] if d["worker_type"]]
    return dict(rate=rate, settled_s=settled, workers=f"{chosen} {kinds[-1] if kinds else kind}", tuner=tuner)


def label(config: tuple) -> str:
    num_workers, prefetch, kind = config
    return "auto" if num_workers == "auto" else ("0" if num_workers == 0 else f"{num_workers} {kind} p{prefetch}")


def sweep_configs(workers, prefetches, kinds) -> list[tuple]:
    configs = [(0, None, "process")] if 0 in workers else []
    return configs + [(nw, p, k) for nw in workers if nw for p in prefetches for k in kinds]


def case(name: str, step_ms: float, args) -> dict:
    dataset, batch_size = build(name)
    sweep = {}
    for config in sweep_configs(args.workers, args.prefetch, args.kinds):
        sweep[config] = run(dataset, batch_size, config, args.seconds, step_ms)["rate"]
        print(f"{name} step {step_ms:g} ms, {label(config)}: {sweep[config]:,.0f} samples/s", file=sys.stderr)
    ranked = sorted(sweep, key=sweep.__getitem__, reverse=True)
    best = sweep[ranked[0]]
    fewest = min((c for c in sweep if sweep[c] >= 0.98 * best), key=lambda c: (c[0], -sweep[c]))
    finalists = list(dict.fromkeys([*ranked[:3], fewest]))
    rates = {c: [] for c in finalists}
    autos = []
    auto = ("auto", 2, "auto")
    for r in range(args.repeat):
        for config in finalists:
            rates[config].append(run(dataset, batch_size, config, args.seconds, step_ms)["rate"])
        autos.append(run(dataset, batch_size, auto, args.seconds, step_ms, args.auto_seconds - args.seconds))
        print(f"{name} step {step_ms:g} ms, round {r + 1}: auto {autos[-1]['rate']:,.0f} samples/s with "
              f"{autos[-1]['workers']} workers (settled at {autos[-1]['settled_s']:.1f} s)", file=sys.stderr)
    medians = {c: statistics.median(v) for c, v in rates.items()}
    final_best = max(medians.values())
    within = [c for c in medians if medians[c] >= 0.98 * final_best]
    auto_rate = statistics.median(a["rate"] for a in autos)
    return dict(
        workload=name, step_ms=step_ms,
        sweep={label(c): r for c, r in sweep.items()},
        finals={label(c): v for c, v in rates.items()},
        best_config=label(max(medians, key=medians.__getitem__)), best=final_best,
        fewest_within_2pct=min(c[0] for c in within), fewest_config=label(min(within, key=lambda c: c[0])),
        auto_rate=auto_rate, auto_rates=[a["rate"] for a in autos],
        auto_workers=[a["workers"] for a in autos], settled_s=[a["settled_s"] for a in autos],
        tuner=[a["tuner"] for a in autos],
    )


def doubling(args) -> dict:
    """The latency workload with a step; samples cost twice as much from switch_s on."""
    step_ms, batch_size = 30.0, 32
    fixed = {}
    for config in [(16, 2, "process"), (24, 2, "process"), (32, 2, "process"), (32, 4, "process")]:
        dataset = SlowingReads(4000, 0.010, switch_at=0.0)  # already switched: 20 ms a sample
        fixed[config] = run(dataset, batch_size, config, args.seconds, step_ms)["rate"]
        print(f"doubling, fixed {label(config)} at 20 ms: {fixed[config]:,.0f} samples/s", file=sys.stderr)
    runs = []
    for _ in range(args.repeat):
        switch = time.time() + args.switch_s
        dataset = SlowingReads(4000, 0.010, switch_at=switch)
        result = run(dataset, batch_size, ("auto", 2, "auto"), args.seconds, step_ms,
                     args.switch_s + args.auto_seconds - args.seconds)
        # The tuner's clock starts when its pool does, a few ms after `switch` was set.
        after = [d["at_s"] - args.switch_s for d in result["tuner"] if d["at_s"] >= args.switch_s]
        result["resettled_s"] = max(after) if after else 0.0
        runs.append(result)
        print(f"doubling, auto: {result['rate']:,.0f} samples/s with {result['workers']} workers, last change "
              f"{result['resettled_s']:.1f} s after the switch", file=sys.stderr)
    return dict(fixed={label(c): r for c, r in fixed.items()}, best=max(fixed.values()),
                auto_rate=statistics.median(r["rate"] for r in runs), auto_rates=[r["rate"] for r in runs],
                auto_workers=[r["workers"] for r in runs], resettled_s=[r["resettled_s"] for r in runs],
                tuner=[r["tuner"] for r in runs])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", nargs="+", default=["latency", "spotgeo", "python", "tiny"])
    p.add_argument("--steps", type=float, nargs="+", default=[0.0, 30.0])
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2, 4, 8, 16, 32])
    p.add_argument("--prefetch", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--kinds", nargs="+", default=["process", "thread"])
    p.add_argument("--seconds", type=float, default=2.5)
    p.add_argument("--auto-seconds", type=float, default=12.0)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--switch-s", type=float, default=10.0)
    p.add_argument("--no-doubling", action="store_true")
    p.add_argument("--out", default="bench-results/bench_auto.json")
    args = p.parse_args(argv)
    # The step runs on one core, as the CPU side of a GPU training step does; with
    # torch's default intra-op threads on every core, any busy worker would halve it.
    torch.set_num_threads(1)
    _matmuls_per_ms()  # calibrate the step before any worker competes for the CPU
    rows = [case(name, step_ms, args) for name in args.workloads for step_ms in args.steps]
    print("| workload | step (ms) | best fixed (median) | its configuration | fewest workers within 2% | "
          "auto (median) | auto / best | auto's workers | settled after (s) |")
    print("|---|---:|---:|---|---:|---:|---:|---|---|")
    for r in rows:
        print(f"| {r['workload']} | {r['step_ms']:g} | {r['best']:,.0f} | {r['best_config']} | "
              f"{r['fewest_within_2pct']} | {r['auto_rate']:,.0f} | {r['auto_rate'] / r['best']:.2f} | "
              f"{', '.join(map(str, r['auto_workers']))} | "
              f"{', '.join(f'{s:.1f}' for s in r['settled_s'])} |")
    result = {"command": " ".join(["benchmarks/bench_auto.py", *(argv or sys.argv[1:])]), "rows": rows}
    if not args.no_doubling:
        d = result["doubling"] = doubling(args)
        print()
        print("| cost doubles at (s) | best fixed at 20 ms | auto after the switch | auto / best | "
              "auto's workers | last change after the switch (s) |")
        print("|---:|---:|---:|---:|---|---|")
        print(f"| {args.switch_s:g} | {d['best']:,.0f} | {d['auto_rate']:,.0f} | {d['auto_rate'] / d['best']:.2f} | "
              f"{', '.join(map(str, d['auto_workers']))} | {', '.join(f'{s:.1f}' for s in d['resettled_s'])} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
