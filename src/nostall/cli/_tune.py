"""``nostall tune``: the guide's progressive search for num_workers, done by a program.

The guide's method: measure with 0 workers, then 2, then 4, and keep the best.
``tune`` does that for nostall and for torch's own DataLoader (with persistent
workers, torch's best setting), doubling num_workers while it still gains at
least ``GAIN`` and stopping at the first step that does not, then picks the
fewest workers within ``NEAR_BEST`` of the best rate (fewer workers leave CPU
and memory to the training step). ``--start-from`` starts the doubling from a
known count instead (half of it, then it, then twice it, ...): a number, or the
``loader.stats.to_dict()`` of a run with ``num_workers="auto"`` saved as JSON
(the count its tuner settled on).

Each probe builds a loader in this process on the one dataset and measures the
steady rate: samples per second from the first batch on, crossing epoch
boundaries (pauses included, at their natural frequency), for ``--seconds`` and
at least three windows of batches. Start-up (time to first batch) is reported
beside it, not mixed in: a training run pays it once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._measure import (
    RunSpec,
    build_dataset,
    close_loader,
    environment_info,
    loader_factory,
)
from ._measure import _make_step as make_step
from .._options import START_METHODS, is_int, positive_int
from ..observe._stats import batch_len

GAIN = 1.05  # a step must gain this much to go on doubling
NEAR_BEST = 1 / GAIN  # the pick: fewest workers within 5% of the best rate (less is noise)
WORKER_STEPS = (0, 2, 4, 8, 16, 32, 64)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Probe:
    """One measured configuration."""

    loader: str
    num_workers: int
    samples_per_s: float
    time_to_first_batch_s: float
    batches: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def probe(spec: RunSpec, dataset: Any, seconds: float) -> Probe:
    """Measure ``spec``'s steady rate on ``dataset`` in this process (see module doc)."""
    with warnings.catch_warnings():  # torch's "more workers than CPUs" warning: probing that is the point
        warnings.filterwarnings("ignore", message=".*worker processes in total.*")
        return _probe(spec, dataset, seconds)


def _probe(spec: RunSpec, dataset: Any, seconds: float) -> Probe:
    step = make_step(spec.step_ms)
    window = max(1, spec.num_workers * (spec.prefetch_factor or 2))
    min_batches = 3 * window
    clock = time.perf_counter
    started = clock()
    loader = loader_factory(spec, dataset)()
    iterator = None
    first = deadline = last = None
    samples = batches = 0
    try:
        while True:
            iterator = iter(loader)
            got_one = False
            for batch in iterator:
                got_one = True
                now = clock()
                if first is None:
                    first, deadline = now, now + seconds
                else:
                    samples += batch_len(batch)
                    batches += 1
                    last = now
                del batch
                if step is not None:
                    step()
                if now >= deadline and batches >= min_batches:
                    break
            else:
                if got_one:
                    continue  # the epoch ended: go on into the next one, boundary included
                raise RuntimeError("the loader yielded no batch; nothing to tune.")
            break
    finally:
        close_loader(loader, iterator)
    span = (last - first) if last is not None else 0.0
    return Probe(spec.loader, spec.num_workers, samples / span if span > 0 else 0.0,
                 first - started, batches, span)


def worker_steps(start: int | None, max_workers: int) -> list[int]:
    """Worker counts to try in order: 0, 2, 4, 8, ...; from ``start``: half of it,
    it, then doubling."""
    if start is None:
        return [nw for nw in WORKER_STEPS if nw <= max_workers]
    start = min(start, max_workers)
    steps = [start // 2] if start >= 2 else []
    nw = start
    while nw <= max_workers:
        steps.append(nw)
        nw *= 2
    return steps or [max_workers]


def start_from(value: str | None) -> int | None:
    """``--start-from``: a number of workers, or a JSON file of ``loader.stats.to_dict()``
    (the last count the tuner chose, else its ``num_workers``)."""
    if value is None:
        return None
    if value.isdigit():
        count = int(value)
    else:
        try:
            stats = json.loads(Path(value).read_text())
        except (OSError, ValueError) as exc:
            raise SystemExit(f"nostall tune: --start-from {value!r} is neither a number of workers nor a "
                             f"readable JSON file of loader.stats.to_dict() ({exc}).") from None
        tuner = stats.get("tuner") if isinstance(stats, dict) else None
        count = tuner[-1]["workers"] if tuner else (stats.get("num_workers") if isinstance(stats, dict) else None)
        if not is_int(count):
            raise SystemExit(f"nostall tune: {value} holds no tuner decisions and no num_workers: save "
                             "`loader.stats.to_dict()` of a run with num_workers='auto' as JSON.")
    if count < 1:
        raise SystemExit(f"nostall tune: --start-from needs at least 1 worker; got {count}.")
    return count


def search(make_spec, dataset: Any, loader: str, seconds: float, max_workers: int,
           zero: Probe | None, start: int | None = None) -> list[Probe]:
    """The guide's progressive search for one loader: 0, 2, 4, 8, ... workers (or from
    ``start``, see ``worker_steps``), while each step gains at least ``GAIN`` over the
    best so far."""
    probes = [zero] if zero is not None else []
    best = zero.samples_per_s if zero is not None else 0.0
    for nw in worker_steps(start, max_workers):
        if nw > max_workers or (nw == 0 and zero is not None):
            continue
        p = probe(make_spec(loader, nw), dataset, seconds)
        p = dataclasses.replace(p, loader=loader)
        probes.append(p)
        _say(f"    {loader} num_workers={nw}: {p.samples_per_s:.1f} samples/s "
             f"(first batch after {p.time_to_first_batch_s:.2f} s)")
        if nw > 0 and nw >= (start or 0) and p.samples_per_s < GAIN * best:
            break  # (from a start, half of it and it are both measured)
        best = max(best, p.samples_per_s)
    return probes


def pick(probes: list[Probe]) -> Probe:
    """The fewest workers within ``NEAR_BEST`` of the best rate."""
    best = max(p.samples_per_s for p in probes)
    return min((p for p in probes if p.samples_per_s >= NEAR_BEST * best), key=lambda p: p.num_workers)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Declare ``nostall tune``."""
    from ._bench import add_dataset_arguments

    p = subparsers.add_parser(
        "tune",
        description=(
            "The guide's progressive search (0, 2, 4, 8, ... workers, stopping when more no "
            "longer helps) for nostall and for torch's DataLoader with persistent workers, "
            "in a fraction of a full sweep's time. Writes nostall's best configuration as YAML "
            "and prints torch's best as keyword arguments to paste."
        ),
    )
    add_dataset_arguments(p)
    p.add_argument("--start-method", choices=START_METHODS, default=None,
                   help="start method for both loaders (default: the platform's)")
    p.add_argument("--step-ms", type=float, default=0.0,
                   help="simulated training step per batch, ms of CPU (default: 0)")
    p.add_argument("--seconds", type=float, default=2.0,
                   help="steady-state measuring time per probe (default: %(default)s)")
    p.add_argument("--max-workers", type=positive_int, default=32, help="default: %(default)s")
    p.add_argument("--start-from", metavar="N|STATS.json",
                   help="start the search at N workers (half, N, then doubling), or at the count a "
                        "num_workers='auto' run settled on: its loader.stats.to_dict() saved as JSON")
    p.add_argument("--out", default="loader.yaml", help="the YAML file to write (default: %(default)s)")
    p.add_argument("--json", metavar="PATH", help="also write every probe as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``nostall tune``."""
    from ._bench import dataset_fields
    from ..core._loader_config import LoaderConfig

    if args.seconds <= 0 or args.step_ms < 0:
        raise SystemExit("nostall tune: --seconds must be > 0 and --step-ms >= 0.")
    started = time.perf_counter()
    base = dataset_fields(args)
    start = start_from(args.start_from)

    def make_spec(loader: str, nw: int) -> RunSpec:
        extra = dict(start_method=args.start_method, persistent=True) if nw and loader == "torch" else {}
        if nw and loader == "nostall":
            extra = dict(start_method=args.start_method)
        return RunSpec(loader=loader, num_workers=nw, **base, **extra)

    try:
        dataset = build_dataset(make_spec("torch", 0), progress=_say)
    except ValueError as exc:
        raise SystemExit(f"nostall tune: {exc}") from None
    _say(f"tuning on {args.dataset or args.workload}: batch size {args.batch_size}, "
         f"{args.seconds:g} s per probe")
    zero = probe(make_spec("torch", 0), dataset, args.seconds)
    _say(f"    num_workers=0: {zero.samples_per_s:.1f} samples/s")
    results = {}
    for loader in ("nostall", "torch"):
        results[loader] = search(make_spec, dataset, loader, args.seconds, args.max_workers,
                                 dataclasses.replace(zero, loader=loader), start)
    best = {loader: pick(probes) for loader, probes in results.items()}
    elapsed = time.perf_counter() - started

    ns, tb = best["nostall"], best["torch"]
    config = LoaderConfig(batch_size=args.batch_size, shuffle=True, num_workers=ns.num_workers,
                          multiprocessing_context=args.start_method if ns.num_workers else None)
    torch_kwargs = {"batch_size": args.batch_size, "shuffle": True, "num_workers": tb.num_workers}
    if tb.num_workers:
        torch_kwargs["persistent_workers"] = True
        if args.start_method:
            torch_kwargs["multiprocessing_context"] = args.start_method
    measured = {
        "dataset": args.dataset or f"{args.workload} ({base['size']} samples)",
        "nostall_samples_per_s": round(ns.samples_per_s, 1),
        "torch_best": torch_kwargs,
        "torch_samples_per_s": round(tb.samples_per_s, 1),
        "tune_seconds": round(elapsed, 1),
        "probes": [p.to_dict() for probes in results.values() for p in probes],
    }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    config.save(path, comment=f"written by `nostall tune` ({time.strftime('%Y-%m-%d %H:%M')})",
                sections={"measured": measured})

    print()
    print("| loader | num_workers | samples/s | time to first batch (s) |")
    print("|---|---:|---:|---:|")
    for loader, probes in results.items():
        for p in probes:
            mark = "  <- best" if p is best[loader] else ""
            print(f"| {loader} | {p.num_workers} | {p.samples_per_s:.1f} | {p.time_to_first_batch_s:.2f} |{mark}")
    print()
    args_text = ", ".join(f"{k}={v!r}" for k, v in torch_kwargs.items())
    print(f"nostall: num_workers={ns.num_workers}, {ns.samples_per_s:.1f} samples/s "
          f"-> {path} (nostall.DataLoader.from_config(dataset, {str(path)!r}))")
    print(f"torch:   DataLoader(dataset, {args_text}), {tb.samples_per_s:.1f} samples/s")
    if tb.samples_per_s > 0:
        print(f"nostall / torch: {ns.samples_per_s / tb.samples_per_s:.2f}x")
    print(f"tuned in {elapsed:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(measured, environment=environment_info()), indent=2) + "\n")
    return 0
