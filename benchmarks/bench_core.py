#!/usr/bin/env python
"""Core benchmark: nostall against torch's DataLoader, side by side.

Question
    On the guide's workload (SpotGEO-like 640x480 PNG frames: decode, random
    224 crop, flip; batch 32), does nostall remove the pause between epochs
    for every num_workers and start method, without paying for it in time to
    first batch, throughput or memory? And what is its own per-sample overhead
    (tiny samples, where the loader's machinery is the whole cost)?

Command
    .venv/bin/python benchmarks/bench_core.py --out bench-results/bench_core.json
    (``make bench``; ``--quick`` for a smoke run of about a minute)

Method
    Every configuration runs in a fresh subprocess (``nostall._measure``), one
    after the other, on the same machine and the same cached frames. torch runs
    with transient workers (its default) and with ``persistent_workers=True``;
    nostall with its defaults. Figures: time to first batch, each pause between
    epochs, median time per batch within epochs, samples/s over the whole run,
    peak PSS of the process tree. Ratios are nostall / torch within this one
    run: absolute times drift on shared machines, ratios hold.

Output
    A markdown report on stdout (tables and ratios) and every figure as JSON
    in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nostall import _measure
from nostall._measure import LOADERS, START_METHODS, MeasureFailed, RunResult, RunSpec


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=1280, help="SpotGEO-like frames (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=3, help="default: %(default)s")
    p.add_argument("--batch-size", type=int, default=32, help="default: %(default)s")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4, 8], help="default: 0 2 4 8")
    p.add_argument("--methods", nargs="+", choices=START_METHODS, default=["fork", "spawn"],
                   help="start methods (default: fork spawn)")
    p.add_argument("--loaders", nargs="+", choices=LOADERS, default=list(LOADERS))
    p.add_argument("--step-ms", type=float, default=0.0, help="simulated training step per batch")
    p.add_argument("--tiny-samples", type=int, default=200_000, help="TinySamples size (default: %(default)s)")
    p.add_argument("--tiny-batch-size", type=int, default=256)
    p.add_argument("--tiny-workers", type=int, default=2)
    p.add_argument("--no-tiny", action="store_true", help="skip the tiny-samples section")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 320 frames, 2 epochs, workers 0 2, fork only, 50,000 tiny samples")
    p.add_argument("--cache-dir", default=None, help="where frames are kept")
    p.add_argument("--repeat", type=int, default=1,
                   help="runs per configuration, in rounds; figures are medians (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per configuration")
    p.add_argument("--out", default="bench-results/bench_core.json", help="JSON output path")
    args = p.parse_args(argv)
    if args.quick:
        args.frames, args.epochs, args.workers, args.methods = 320, 2, [0, 2], ["fork"]
        args.tiny_samples = 50_000
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def run_all(specs: list[RunSpec], timeout: float, tag: str, repeat: int = 1) -> list[RunResult | MeasureFailed]:
    """Run every spec ``repeat`` times, in rounds (all specs, then all again), so
    that slow drift of the machine spreads over every configuration alike; a
    spec's figures are the medians over its runs. A spec that fails once fails."""
    runs: dict[int, list[RunResult]] = {i: [] for i in range(len(specs))}
    failed: dict[int, MeasureFailed] = {}
    for round_no in range(repeat):
        for i, spec in enumerate(specs):
            if i in failed:
                continue
            rnd = f" round {round_no + 1}/{repeat}" if repeat > 1 else ""
            _say(f"[{tag} {i + 1}/{len(specs)}{rnd}] {spec.label()} ...")
            t = time.perf_counter()
            try:
                result = _measure.run_isolated(spec, timeout=timeout)
            except MeasureFailed as exc:
                _say(f"    FAILED: {exc}")
                failed[i] = exc
                continue
            _say(f"    {_measure.summary_line(result)}  [{time.perf_counter() - t:.0f} s]")
            runs[i].append(result)
    return [failed[i] if i in failed else _measure.median_of_runs(runs[i]) for i in range(len(specs))]


# --------------------------------------------------------------------------- #
# Ratios
# --------------------------------------------------------------------------- #


def _find(items: Sequence[RunResult | MeasureFailed], **match: Any) -> RunResult | None:
    for item in items:
        if not isinstance(item, RunResult) or item.spec is None:
            continue
        spec = item.spec
        if all(
            (spec.persistent_effective if k == "persistent" else getattr(spec, k)) == v
            for k, v in match.items()
        ):
            return item
    return None


def _ratio(a: float, b: float) -> float:
    if a is None or b is None or math.isnan(a) or math.isnan(b) or b == 0:
        return math.nan
    return a / b


def compute_ratios(
    main: Sequence[RunResult | MeasureFailed], tiny: Sequence[RunResult | MeasureFailed]
) -> list[dict[str, Any]]:
    """The ratios that matter, nostall / torch unless stated. One dict per ratio."""
    rows: list[dict[str, Any]] = []

    def add(name: str, config: str, value: float, nostall_value: float, torch_value: float,
            better: str) -> None:
        rows.append({"ratio": name, "config": config, "value": value,
                     "nostall": nostall_value, "reference": torch_value, "better": better})

    specs = [i.spec for i in main if isinstance(i, RunResult) and i.spec is not None]
    combos = sorted({(s.num_workers, s.start_method) for s in specs},
                    key=lambda c: (c[0], c[1] or ""))

    # 1. Time to first batch, spawn with the most workers (8 by default).
    spawn_nw = sorted({nw for nw, m in combos if m == "spawn" and nw > 0})
    if spawn_nw:
        nw = spawn_nw[-1]
        ns = _find(main, loader="nostall", num_workers=nw, start_method="spawn")
        for persistent in (False, True):
            tr = _find(main, loader="torch", num_workers=nw, start_method="spawn", persistent=persistent)
            if ns and tr:
                add("time to first batch", f"spawn, {nw} workers, vs torch "
                    f"{'persistent' if persistent else 'transient'}",
                    _ratio(ns.time_to_first_batch_s, tr.time_to_first_batch_s),
                    ns.time_to_first_batch_s, tr.time_to_first_batch_s, "lower")

    for nw, method in combos:
        where = f"{nw} workers" + (f", {method}" if method else "")
        ns = _find(main, loader="nostall", num_workers=nw, start_method=method)
        if ns is None:
            continue
        # 2. Pause vs nostall's own time per batch (<= 1: the boundary costs no more
        # than an ordinary batch), and vs the longest ordinary gap inside its epochs
        # (<= 1: the boundary is indistinguishable from any other moment).
        add("max pause / own time per batch", where,
            _ratio(ns.max_pause_s, ns.mean_batch_s), ns.max_pause_s, ns.mean_batch_s, "lower")
        add("max pause / own longest in-epoch gap", where,
            _ratio(ns.max_pause_s, ns.max_batch_s), ns.max_pause_s, ns.max_batch_s, "lower")
        if nw == 0:
            tr0 = _find(main, loader="torch", num_workers=0)
            if tr0:
                add("samples/s", where + ", vs torch", _ratio(ns.samples_per_s, tr0.samples_per_s),
                    ns.samples_per_s, tr0.samples_per_s, "higher")
            continue
        tp = _find(main, loader="torch", num_workers=nw, start_method=method, persistent=True)
        tt = _find(main, loader="torch", num_workers=nw, start_method=method, persistent=False)
        # 3. Pause vs torch's persistent-workers pause.
        if tp:
            add("max pause", where + ", vs torch persistent", _ratio(ns.max_pause_s, tp.max_pause_s),
                ns.max_pause_s, tp.max_pause_s, "lower")
        # 4. Throughput per num_workers.
        for ref, name in ((tp, "persistent"), (tt, "transient")):
            if ref:
                add("samples/s", f"{where}, vs torch {name}", _ratio(ns.samples_per_s, ref.samples_per_s),
                    ns.samples_per_s, ref.samples_per_s, "higher")
        if tp:
            add("peak PSS", where + ", vs torch persistent",
                _ratio(ns.peak_memory_mb, tp.peak_memory_mb), ns.peak_memory_mb, tp.peak_memory_mb, "lower")

    # 5. Tiny samples: the loader's own overhead.
    ns = next((i for i in tiny if isinstance(i, RunResult) and i.spec and i.spec.loader == "nostall"), None)
    if ns is not None and ns.spec is not None:
        nw = ns.spec.num_workers
        for persistent in (True, False):
            tr = _find(tiny, loader="torch", num_workers=nw, persistent=persistent)
            if tr:
                add("tiny samples/s", f"{nw} workers, vs torch {'persistent' if persistent else 'transient'}",
                    _ratio(ns.samples_per_s, tr.samples_per_s), ns.samples_per_s, tr.samples_per_s, "higher")
        tr0 = _find(tiny, loader="torch", num_workers=0)
        if tr0:
            add("tiny samples/s", "nostall vs torch 0 workers", _ratio(ns.samples_per_s, tr0.samples_per_s),
                ns.samples_per_s, tr0.samples_per_s, "higher")
    return rows


def format_ratios(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| ratio (nostall / reference) | configuration | ratio | nostall | reference | better |",
             "|---|---|---:|---:|---:|---|"]
    for r in rows:
        def f(v: float) -> str:
            return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3g}"
        lines.append(f"| {r['ratio']} | {r['config']} | {f(r['value'])} | {f(r['nostall'])} | "
                     f"{f(r['reference'])} | {r['better']} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- #


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    env = _measure.environment_info()
    loaders = list(args.loaders)
    if "nostall" in loaders and not env["nostall_available"]:
        _say("note: nostall.DataLoader is not importable; running torch's rows only.")
        loaders.remove("nostall")

    from nostall._workloads import ensure_spotgeo

    t = time.perf_counter()
    frames_dir = ensure_spotgeo(args.frames, args.cache_dir, progress=_say)
    _say(f"{args.frames} frames ready in {frames_dir} ({time.perf_counter() - t:.1f} s)")

    main_specs = _measure.comparison_specs(
        workers=args.workers, start_methods=args.methods, loaders=loaders,
        workload="spotgeo", size=args.frames, batch_size=args.batch_size, epochs=args.epochs,
        step_ms=args.step_ms, cache_dir=args.cache_dir,
    )
    main_items = run_all(main_specs, args.timeout, "spotgeo", args.repeat)

    tiny_items: list[RunResult | MeasureFailed] = []
    if not args.no_tiny:
        common = dict(workload="tiny", size=args.tiny_samples, batch_size=args.tiny_batch_size,
                      epochs=args.epochs, step_ms=0.0)
        tiny_specs = [RunSpec(loader="torch", num_workers=0, **common)]
        for loader in loaders:
            if loader == "torch":
                for persistent in (False, True):
                    tiny_specs.append(RunSpec(loader="torch", num_workers=args.tiny_workers,
                                              start_method="fork", persistent=persistent, **common))
            else:
                tiny_specs.append(RunSpec(loader=loader, num_workers=args.tiny_workers,
                                          start_method="fork", **common))
        tiny_items = run_all(tiny_specs, args.timeout, "tiny", args.repeat)

    ratios = compute_ratios(main_items, tiny_items)
    duration = time.perf_counter() - started
    command = " ".join(["python benchmarks/bench_core.py", *args.argv])

    print("## Core benchmark: nostall vs torch DataLoader\n")
    print(f"Command: `{command}`  ")
    print(f"Machine: {env['usable_cpus']} CPUs, Python {env['python']}, torch {env['torch']}, "
          f"{env['platform']}  ")
    print(f"Duration: {duration:.0f} s" + (f", figures are medians of {args.repeat} runs" if args.repeat > 1 else "")
          + "\n")
    print(f"### SpotGEO-like frames ({args.frames} frames, batch {args.batch_size}, {args.epochs} epochs)\n")
    print(_measure.format_table(main_items))
    if tiny_items:
        print(f"\n### Tiny samples ({args.tiny_samples:,} samples of ~10 us, batch {args.tiny_batch_size}, "
              f"{args.epochs} epochs)\n")
        print(_measure.format_table(tiny_items))
    print("\n### Ratios\n")
    print(format_ratios(ratios))
    sys.stdout.flush()

    payload = {
        "command": command,
        "environment": env,
        "duration_s": duration,
        "arguments": {k: v for k, v in vars(args).items() if k != "argv"},
        "spotgeo": [i.to_dict() for i in main_items if isinstance(i, RunResult)],
        "tiny": [i.to_dict() for i in tiny_items if isinstance(i, RunResult)],
        "ratios": [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
                   for r in ratios],
        "failures": [{"spec": i.spec.to_dict(), "reason": i.reason, "output": i.output_tail}
                     for i in (*main_items, *tiny_items) if isinstance(i, MeasureFailed)],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    _say(f"wrote {out}; benchmark took {duration:.0f} s")
    return 0 if not payload["failures"] else 1


if __name__ == "__main__":
    sys.exit(main())
