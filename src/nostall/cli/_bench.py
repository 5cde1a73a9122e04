"""``nostall bench``: the guide's num_workers table, torch's DataLoader and nostall side by side.

Every configuration runs in a fresh process (``_measure.run_isolated``), one after
the other, on a built-in workload or the user's ``module:factory`` dataset. The
table gets a verdict per row; the raw figures go to JSON and a PNG figure
(samples/s against num_workers, and a timeline of batch arrivals showing the
pauses).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from . import _measure
from ._measure import LOADERS, MeasureFailed, RunResult, RunSpec
from .._options import START_METHODS, non_negative_int, positive_int
from ._workloads import WORKLOADS

Item = RunResult | MeasureFailed


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


def run_sweep(specs: Sequence[RunSpec], timeout: float) -> list[Item]:
    """Run every spec in a fresh process, one after the other, showing progress
    (what runs, elapsed time, an estimate of what is left) on stderr."""
    items: list[Item] = []
    started = time.perf_counter()
    for i, spec in enumerate(specs, 1):
        elapsed = time.perf_counter() - started
        left = f", about {_clock(elapsed / (i - 1) * (len(specs) - i + 1))} left" if i > 1 else ""
        _say(f"[{i}/{len(specs)} {_clock(elapsed)} elapsed{left}] {spec.label()} ...")
        try:
            result = _measure.run_isolated(spec, timeout=timeout)
        except MeasureFailed as exc:
            _say(f"    FAILED: {exc}")
            items.append(exc)
            continue
        _say("    " + _measure.summary_line(result))
        items.append(result)
    return items


def verdicts(items: Sequence[Item]) -> list[str]:
    """One verdict per row, against the other rows of the same sweep: throughput
    relative to the best, long pauses, slow starts, memory."""
    ok = [i for i in items if isinstance(i, RunResult)]
    if not ok:
        return ["failed" for _ in items]
    best = max(r.samples_per_s for r in ok)
    fastest_start = min(r.time_to_first_batch_s for r in ok)
    least_memory = min(r.peak_memory_mb for r in ok)
    out = []
    for item in items:
        if not isinstance(item, RunResult):
            out.append("failed")
            continue
        share = item.samples_per_s / best if best > 0 else 0.0
        if share >= 0.999:
            parts = ["best throughput"]
        elif share >= 0.95:
            parts = [f"{share:.0%} of best"]
        else:
            parts = [f"slow: {share:.0%} of best"]
        pause = item.max_pause_s
        if not math.isnan(pause) and pause > max(0.1, 3 * item.mean_batch_s):
            parts.append(f"pauses {pause:.2f} s between epochs")
        if item.time_to_first_batch_s > max(1.0, 3 * fastest_start):
            parts.append(f"slow start ({item.time_to_first_batch_s:.1f} s)")
        if item.peak_memory_mb > 1.5 * least_memory:
            parts.append(f"{item.peak_memory_mb / least_memory:.1f}x the memory of the leanest")
        out.append("; ".join(parts))
    return out


def dataset_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The RunSpec fields that :func:`add_dataset_arguments` (and ``--step-ms``) set."""
    fields: dict[str, Any] = dict(workload=args.dataset or args.workload, batch_size=args.batch_size,
                                  step_ms=args.step_ms, cache_dir=args.cache_dir, collate=args.collate)
    if args.size is not None:
        fields["size"] = args.size
    elif not args.dataset:
        fields["size"] = 1280 if args.workload == "spotgeo" else WORKLOADS[args.workload].default_size
    return fields


def sweep_specs(args: argparse.Namespace) -> list[RunSpec]:
    """The configurations of a sweep: for each num_workers and start method, torch
    transient and/or persistent (``--persistent``), then nostall."""
    persist = {"both": (False, True), "on": (True,), "off": (False,)}[args.persistent]
    return _measure.comparison_specs(
        workers=args.workers, start_methods=args.start_methods, loaders=args.loaders,
        torch_persistent=persist,
        nostall_persistent=False if args.persistent == "off" else None,  # nostall persists by default
        **dataset_fields(args), epochs=args.epochs, batches_per_epoch=args.batches,
    )


def add_dataset_arguments(p: argparse.ArgumentParser) -> None:
    """--workload / --dataset / --collate / --size / --batch-size, shared by bench and tune."""
    what = p.add_mutually_exclusive_group()
    what.add_argument("--workload", choices=sorted(WORKLOADS), default="spotgeo",
                      help="a built-in workload (default: %(default)s): "
                      + "; ".join(f"{w.name}: {w.description}" for w in WORKLOADS.values()))
    what.add_argument("--dataset", metavar="MODULE:FACTORY",
                      help="your dataset: a function returning it, importable from the current directory")
    p.add_argument("--collate", metavar="MODULE:FN", help="your collate_fn (default: torch's default_collate)")
    p.add_argument("--size", type=positive_int, help="samples of a built-in workload "
                   "(default: 1280 frames for spotgeo, the workload's default otherwise)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="default: %(default)s")
    p.add_argument("--cache-dir", default=None, help="where the SpotGEO-like frames are kept")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Declare ``nostall bench``."""
    p = subparsers.add_parser(
        "bench",
        description=(
            "Measure torch's DataLoader and nostall side by side on a workload: each configuration "
            "in a fresh process, then the guide's table (num_workers, pause between epochs, time "
            "per batch, samples/s, peak memory, verdict), the raw figures as JSON and a PNG figure."
        ),
    )
    add_dataset_arguments(p)
    p.add_argument("--workers", type=non_negative_int, nargs="+", default=[0, 2, 4, 8], metavar="N",
                   help="num_workers values (default: 0 2 4 8)")
    p.add_argument("--persistent", choices=("both", "on", "off"), default="both",
                   help="torch's persistent_workers: both (default), on or off")
    p.add_argument("--start-method", nargs="+", choices=START_METHODS, default=["fork"],
                   dest="start_methods", help="start methods (default: fork)")
    p.add_argument("--loaders", nargs="+", choices=LOADERS, default=list(LOADERS))
    p.add_argument("--epochs", type=positive_int, default=3, help="default: %(default)s")
    p.add_argument("--batches", type=positive_int, default=None,
                   help="batches per epoch (default: the whole dataset)")
    p.add_argument("--step-ms", type=float, default=0.0,
                   help="simulated training step per batch, ms of CPU (default: 0)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per configuration")
    p.add_argument("--out", default="nostall-bench", metavar="DIR",
                   help="where bench.json and bench.png go (default: %(default)s)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``nostall bench``; 0 when every configuration ran."""
    if args.step_ms < 0:
        raise SystemExit(f"nostall bench: --step-ms must be >= 0; got {args.step_ms}.")
    if "nostall" in args.loaders and not _measure.nostall_available():
        _say("note: nostall.DataLoader is not importable here; showing torch's rows only.")
        args.loaders = [x for x in args.loaders if x != "nostall"]
    try:
        specs = sweep_specs(args)
    except ValueError as exc:
        raise SystemExit(f"nostall bench: {exc}") from None
    if not args.dataset and args.workload == "spotgeo":
        from ._workloads import ensure_spotgeo

        ensure_spotgeo(specs[0].size, args.cache_dir, progress=_say)
    started = time.perf_counter()
    items = run_sweep(specs, args.timeout)
    notes = verdicts(items)
    spec = specs[0]
    what = args.dataset or f"{args.workload} ({spec.size} samples)"
    print()
    print(f"{what}, batch size {args.batch_size}, {args.epochs} epochs"
          + (f" of {args.batches} batches" if args.batches else "")
          + (f", training step {args.step_ms:g} ms" if args.step_ms else "")
          + f", {_measure.environment_info()['usable_cpus']} CPUs")
    print()
    print(_measure.format_table(items, notes))
    print()
    print(f"bench finished in {time.perf_counter() - started:.0f} s")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "command": " ".join(["nostall", *getattr(args, "argv", [])]),
        "environment": _measure.environment_info(),
        "results": [dict(i.to_dict(), verdict=v) for i, v in zip(items, notes) if isinstance(i, RunResult)],
        "failures": [{"spec": i.spec.to_dict(), "reason": i.reason, "output": i.output_tail}
                     for i in items if isinstance(i, MeasureFailed)],
    }
    (out / "bench.json").write_text(json.dumps(payload, indent=2) + "\n")
    _say(f"wrote {out / 'bench.json'}")
    try:
        from ._plot import plot_bench

        plot_bench(payload["results"] + payload["failures"], out / "bench.png")
        _say(f"wrote {out / 'bench.png'}")
    except ImportError as exc:
        _say(f"no figure: {exc}")
    return 0 if all(isinstance(i, RunResult) for i in items) else 1
