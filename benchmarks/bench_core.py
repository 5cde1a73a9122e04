#!/usr/bin/env python
"""Core benchmark: nostall against torch's DataLoader, side by side.

Question
    On the guide's workload (SpotGEO-like 640x480 PNG frames: decode, random
    224 crop, flip; batch 32), does nostall remove the pause between epochs
    for every num_workers and start method, without paying for it in time to
    first batch, throughput or memory? And what is its own per-sample overhead
    (tiny samples, where the loader's machinery is the whole cost)?

    And the pause targets of issue 11: with an empty loop (spawn, 8 workers, every
    frame, 3 epochs), is every pause between epochs at most nostall's own longest
    gap between two batches inside an epoch? With a loop slower than the loader
    (a 100 ms training step, fork, 2 workers), is every pause <= 10 ms and <= 0.2x
    torch's persistent-workers pause?

Command
    .venv/bin/python benchmarks/bench_core.py --out bench-results/bench_core.json
    (``make bench``; ``--quick`` for a smoke run of about a minute;
    ``--pause-targets --repeat 3`` runs only the pause targets, with verdicts)

Method
    Every configuration runs in a fresh subprocess (``nostall.cli._measure``), one
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
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nostall.cli import _measure
from nostall.cli._measure import LOADERS, START_METHODS, MeasureFailed, RunResult, RunSpec


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
    p.add_argument("--pause-targets", action="store_true",
                   help="run only the pause targets of issue 11 (spawn 8 workers, empty loop; "
                        "fork 2 workers with a training step), torch persistent and nostall")
    p.add_argument("--no-pause-targets", action="store_true", help="skip the pause-targets section")
    p.add_argument("--target-workers", type=int, default=8, help="workers of the empty-loop target (default: 8)")
    p.add_argument("--target-step-ms", type=float, default=100.0,
                   help="training step of the slow-loop target (default: %(default)s)")
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
    return [item if isinstance(item, MeasureFailed) else _measure.median_of_runs(item)
            for item in run_rounds(specs, timeout, tag, repeat)]


def run_rounds(specs: list[RunSpec], timeout: float, tag: str,
               repeat: int = 1) -> list[list[RunResult] | MeasureFailed]:
    """Like :func:`run_all`, but every run of each spec (for per-run checks)."""
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
    return [failed[i] if i in failed else runs[i] for i in range(len(specs))]


# --------------------------------------------------------------------------- #
# The pause targets (issue 11, section 6)
# --------------------------------------------------------------------------- #

PAUSE_LIMIT_S = 0.010  # with a loop slower than the loader: every pause at most this
PAUSE_VS_TORCH = 0.2  # ... and at most this share of torch's persistent-workers pause


def pause_target_specs(args: argparse.Namespace) -> tuple[list[RunSpec], list[RunSpec]]:
    """(a) the empty loop: spawn, ``--target-workers`` workers, every frame, torch
    persistent and nostall; (b) a loop slower than the loader: a ``--target-step-ms``
    training step, fork, 2 workers, torch persistent and nostall."""
    common = dict(workload="spotgeo", size=args.frames, batch_size=args.batch_size, epochs=args.epochs,
                  cache_dir=args.cache_dir)
    empty = [RunSpec(loader="torch", num_workers=args.target_workers, start_method="spawn", persistent=True,
                     **common),
             RunSpec(loader="nostall", num_workers=args.target_workers, start_method="spawn", **common)]
    slow = [RunSpec(loader="torch", num_workers=2, start_method="fork", persistent=True,
                    step_ms=args.target_step_ms, **common),
            RunSpec(loader="nostall", num_workers=2, start_method="fork", step_ms=args.target_step_ms, **common)]
    return empty, slow


def _median(values: Sequence[float]) -> float:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(finite) if finite else math.nan


def pause_verdicts(empty: Sequence, slow: Sequence) -> list[dict[str, Any]]:
    """The two targets, checked on the medians over runs (each run's figures listed).

    (a) every pause between epochs <= nostall's own longest gap between two batches
    inside an epoch (per run: its largest pause over its longest in-epoch gap);
    (b) every pause <= 10 ms, and <= 0.2x torch's persistent-workers pause at the
    same boundary (medians over runs, boundary by boundary)."""
    rows: list[dict[str, Any]] = []
    ns_runs = empty[1] if isinstance(empty[1], list) else []
    if ns_runs:
        per_run = [_ratio(r.max_pause_s, r.max_batch_s) for r in ns_runs]
        held = sum(1 for v in per_run if v <= 1.0)
        rows.append({
            "target": "empty loop: every pause <= own longest in-epoch gap",
            "config": f"spawn, {ns_runs[0].spec.num_workers} workers",
            "figures": "runs: " + "; ".join(
                f"pauses {_measure.format_pauses(r.epoch_pauses_s)} s, longest gap {r.max_batch_s:.3f} s"
                for r in ns_runs),
            "value": _median(per_run), "limit": 1.0,
            "detail": f"max pause / longest gap per run: {', '.join(f'{v:.2f}' for v in per_run)}; "
                      f"held in {held} of {len(per_run)} runs",
            "held": _median(per_run) <= 1.0,
        })
    tr_runs = slow[0] if isinstance(slow[0], list) else []
    ns_runs = slow[1] if isinstance(slow[1], list) else []
    if ns_runs:
        ns_pauses = [_median(col) for col in zip(*(r.epoch_pauses_s for r in ns_runs))]
        per_run_max = [r.max_pause_s for r in ns_runs]
        held = sum(1 for v in per_run_max if v <= PAUSE_LIMIT_S)
        step = ns_runs[0].spec.step_ms
        rows.append({
            "target": f"{step:.0f} ms step: every pause <= {PAUSE_LIMIT_S * 1000:.0f} ms",
            "config": "fork, 2 workers",
            "figures": "runs: " + "; ".join(_measure.format_pauses(r.epoch_pauses_s) for r in ns_runs),
            "value": max(ns_pauses), "limit": PAUSE_LIMIT_S,
            "detail": f"largest pause per run (s): {', '.join(f'{v:.4f}' for v in per_run_max)}; "
                      f"held in {held} of {len(per_run_max)} runs; time per batch per run (s): "
                      f"{', '.join(f'{r.mean_batch_s:.4f}' for r in ns_runs)} (above the step: the loop "
                      "also waited for data inside that run's epochs)",
            "held": max(ns_pauses) <= PAUSE_LIMIT_S,
        })
        if tr_runs:
            tr_pauses = [_median(col) for col in zip(*(r.epoch_pauses_s for r in tr_runs))]
            ratios = [_ratio(a, b) for a, b in zip(ns_pauses, tr_pauses)]
            rows.append({
                "target": f"{step:.0f} ms step: every pause <= {PAUSE_VS_TORCH}x torch's persistent pause",
                "config": "fork, 2 workers",
                "figures": f"nostall {', '.join(f'{v:.4f}' for v in ns_pauses)} s; "
                           f"torch persistent {', '.join(f'{v:.4f}' for v in tr_pauses)} s (medians)",
                "value": max(ratios), "limit": PAUSE_VS_TORCH,
                "detail": f"per boundary: {', '.join(f'{v:.3f}' for v in ratios)}",
                "held": all(v <= PAUSE_VS_TORCH for v in ratios),
            })
    return rows


def format_verdicts(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| target | configuration | figures | value | limit | verdict |", "|---|---|---|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['target']} | {r['config']} | {r['figures']}; {r['detail']} | {r['value']:.3g} | "
                     f"{r['limit']:g} | {'held' if r['held'] else 'NOT HELD'} |")
    return "\n".join(lines)


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

    from nostall.cli._workloads import ensure_spotgeo

    t = time.perf_counter()
    frames_dir = ensure_spotgeo(args.frames, args.cache_dir, progress=_say)
    _say(f"{args.frames} frames ready in {frames_dir} ({time.perf_counter() - t:.1f} s)")

    main_items: list[RunResult | MeasureFailed] = []
    if not args.pause_targets:
        main_specs = _measure.comparison_specs(
            workers=args.workers, start_methods=args.methods, loaders=loaders,
            workload="spotgeo", size=args.frames, batch_size=args.batch_size, epochs=args.epochs,
            step_ms=args.step_ms, cache_dir=args.cache_dir,
        )
        main_items = run_all(main_specs, args.timeout, "spotgeo", args.repeat)

    target_runs: list = []
    target_rows: list[dict[str, Any]] = []
    if not args.no_pause_targets and set(loaders) == set(LOADERS):  # the targets compare both
        empty, slow = pause_target_specs(args)
        target_runs = run_rounds(empty + slow, args.timeout, "pause targets", args.repeat)
        target_rows = pause_verdicts(target_runs[:2], target_runs[2:])

    tiny_items: list[RunResult | MeasureFailed] = []
    if not args.no_tiny and not args.pause_targets:
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
    if main_items:
        print(f"### SpotGEO-like frames ({args.frames} frames, batch {args.batch_size}, {args.epochs} epochs)\n")
        print(_measure.format_table(main_items))
    if tiny_items:
        print(f"\n### Tiny samples ({args.tiny_samples:,} samples of ~10 us, batch {args.tiny_batch_size}, "
              f"{args.epochs} epochs)\n")
        print(_measure.format_table(tiny_items))
    if main_items or tiny_items:
        print("\n### Ratios\n")
        print(format_ratios(ratios))
    if target_rows:
        medians = [item if isinstance(item, MeasureFailed) else _measure.median_of_runs(item)
                   for item in target_runs]
        print(f"\n### Pause targets ({args.frames} frames, batch {args.batch_size}, {args.epochs} epochs; "
              f"the empty loop, then a {args.target_step_ms:.0f} ms training step)\n")
        print(_measure.format_table(medians))
        print()
        print(format_verdicts(target_rows))
        print(f"\n{sum(r['held'] for r in target_rows)} of {len(target_rows)} pause targets held.")
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
        "pause_targets": {
            "runs": [[r.to_dict() for r in item] for item in target_runs if isinstance(item, list)],
            "verdicts": [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
                         for r in target_rows],
        },
        "failures": [{"spec": i.spec.to_dict(), "reason": i.reason, "output": i.output_tail}
                     for i in (*main_items, *tiny_items, *target_runs) if isinstance(i, MeasureFailed)],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    _say(f"wrote {out}; benchmark took {duration:.0f} s")
    return 0 if not payload["failures"] else 1


if __name__ == "__main__":
    sys.exit(main())
