#!/usr/bin/env python
"""Memory benchmark: copy-on-read growth with plain lists against nostall's flat containers.

Question
    A dataset holds 1,000,000 annotation dicts (path, label, 4-float bbox, a few
    tags). With 4 workers for 2 epochs, how much memory does the process tree
    take, against torch's 0-worker figure, for torch and nostall, under fork and
    spawn, with the plain list and with ``nostall.flat(rows)``? And is loading
    with the flat containers slower? (pytorch/pytorch#13246)

Command
    .venv/bin/python benchmarks/bench_memory.py --out bench-results/bench_memory.json
    (``--rows 100000`` for a run of about a minute)

Method
    Every configuration runs in a fresh subprocess (``nostall.cli._measure``), one
    after the other: it builds the rows (and converts them with ``flat``, then
    drops the list), builds the loader, iterates 2 epochs (batch 256, shuffled)
    and closes it. ``__getitem__`` is cheap, as in the issue: a 4-float tensor
    from the bbox and the label. Figures: peak PSS summed over the process tree
    (``nostall.observe._memory.ProcessTreeMemory``; PSS splits shared pages between the
    processes sharing them, so forked workers are not counted several times),
    sampled every 50 ms; samples/s from loader construction to the last batch
    (worker start-up included). torch runs with ``persistent_workers=True``, the
    fairer comparison for throughput (``--torch-transient`` for its default).
    Ratios are to torch with 0 workers over the plain list, in this run.

Output
    A markdown table on stdout and every figure as JSON in ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

ROWS_ENV = "NOSTALL_BENCH_MEMORY_ROWS"
TAGS = ("occluded", "truncated", "night", "blurred", "crowd", "difficult")


# --------------------------------------------------------------------------- #
# The dataset (imported by name in the measured subprocesses and their workers)
# --------------------------------------------------------------------------- #


def annotations(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` annotation dicts as a JSON loader would give them: every value its own object."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 1000, n).tolist()
    boxes = np.round(rng.uniform(0, 640, (n, 4)), 1).tolist()
    tag_counts = rng.integers(0, 3, n).tolist()
    tag_ids = rng.integers(0, len(TAGS), (n, 2)).tolist()
    return [
        {
            "path": f"images/train/{i // 1000:04d}/{i:08d}.jpg",
            "label": labels[i],
            "bbox": boxes[i],
            "tags": [f"{TAGS[t]}" for t in tag_ids[i][: tag_counts[i]]],
        }
        for i in range(n)
    ]


class Annotations(Dataset):
    """One annotation per sample: the bbox as a small tensor, and the label."""

    def __init__(self, rows: Sequence[dict[str, Any]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = self.rows[i]
        return torch.tensor(row["bbox"]), row["label"]


def _rows() -> int:
    return int(os.environ.get(ROWS_ENV, "1000000"))


def plain_dataset() -> Annotations:
    """The dataset over a plain list of dicts (``bench_memory:plain_dataset``)."""
    return Annotations(annotations(_rows()))


def flat_dataset() -> Annotations:
    """The same rows converted with ``nostall.flat`` (``bench_memory:flat_dataset``)."""
    from nostall.containers._flat import flat

    rows = annotations(_rows())
    table = flat(rows)
    del rows
    gc.collect()
    return Annotations(table)


# --------------------------------------------------------------------------- #
# The benchmark
# --------------------------------------------------------------------------- #


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000, help="annotation dicts (default: %(default)s)")
    p.add_argument("--workers", type=int, default=4, help="default: %(default)s")
    p.add_argument("--epochs", type=int, default=2, help="default: %(default)s")
    p.add_argument("--batch-size", type=int, default=256, help="default: %(default)s")
    p.add_argument("--methods", nargs="+", choices=("fork", "spawn", "forkserver"), default=["fork", "spawn"])
    p.add_argument("--torch-transient", action="store_true", help="torch without persistent_workers")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per configuration")
    p.add_argument("--out", default="bench-results/bench_memory.json", help="JSON output path")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def specs(args: argparse.Namespace) -> list[tuple[str, Any]]:
    """(dataset kind, RunSpec) for every row of the table, in the order printed."""
    from nostall.cli._measure import RunSpec

    common = {"size": args.rows, "batch_size": args.batch_size, "epochs": args.epochs}
    out = []
    for kind in ("plain", "flat"):
        out.append((kind, RunSpec(loader="torch", workload=f"bench_memory:{kind}_dataset", num_workers=0, **common)))
    for kind in ("plain", "flat"):
        for loader in ("torch", "nostall"):
            for method in args.methods:
                persistent = (not args.torch_transient) if loader == "torch" else None
                out.append((kind, RunSpec(loader=loader, workload=f"bench_memory:{kind}_dataset",
                                          num_workers=args.workers, start_method=method,
                                          persistent=persistent, **common)))
    return out


def conversion_figures(rows: int) -> dict[str, float]:
    """In this process: seconds to build the list and to convert it, and both sizes."""
    from nostall.containers._flat import flat
    from nostall.cli._doctor import estimate_size

    t = time.perf_counter()
    data = annotations(rows)
    built = time.perf_counter() - t
    list_mb = estimate_size(data) / 1e6
    t = time.perf_counter()
    table = flat(data)
    converted = time.perf_counter() - t
    out = {"build_list_s": built, "flat_s": converted, "list_mb_estimate": list_mb,
           "flat_mb": table.nbytes / 1e6, "flat_repr": repr(table)}
    del data, table
    gc.collect()
    return out


def _f(value: float, digits: int = 0) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:,.{digits}f}"


def format_table(rows: list[dict[str, Any]]) -> str:
    header = ("| loader | workers | start | dataset | peak PSS (MB) | x torch 0-worker | samples/s | "
              "first batch (s) | wall (s) |")
    lines = [header, "|---|---:|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['loader']} | {r['num_workers']} | {r['start_method'] or '-'} | {r['dataset']} | "
            + (f"failed: {r['failure']} | | | | |" if r.get("failure") else
               f"{_f(r['peak_pss_mb'])} | {_f(r['ratio'], 2)} | {_f(r['samples_per_s'])} | "
               f"{_f(r['time_to_first_batch_s'], 1)} | {_f(r['wall_s'], 1)} |")
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from nostall.cli import _measure
    from nostall.cli._measure import MeasureFailed

    args = parse_args(argv)
    started = time.perf_counter()
    env = dict(os.environ)
    here = str(Path(__file__).resolve().parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH", "")) if p)
    env[ROWS_ENV] = str(args.rows)

    _say(f"building {args.rows:,} annotation dicts and converting them ...")
    conversion = conversion_figures(args.rows)
    _say(f"    list {conversion['build_list_s']:.1f} s (~{conversion['list_mb_estimate']:.0f} MB), "
         f"flat() {conversion['flat_s']:.1f} s -> {conversion['flat_repr']}")

    table: list[dict[str, Any]] = []
    runs = specs(args)
    for i, (kind, spec) in enumerate(runs):
        _say(f"[{i + 1}/{len(runs)}] {spec.label()} over the {kind} list ...")
        row: dict[str, Any] = {"loader": spec.loader, "num_workers": spec.num_workers,
                               "start_method": spec.start_method, "persistent": spec.persistent_effective,
                               "dataset": kind}
        t = time.perf_counter()
        try:
            result = _measure.run_isolated(spec, timeout=args.timeout, env=env)
        except MeasureFailed as exc:
            _say(f"    FAILED: {exc}")
            row["failure"] = exc.reason
            table.append(row)
            continue
        _say(f"    {_measure.summary_line(result)}  [{time.perf_counter() - t:.0f} s]")
        row.update(peak_pss_mb=result.peak_memory_mb, memory_metric=result.memory_metric,
                   samples_per_s=result.samples_per_s, time_to_first_batch_s=result.time_to_first_batch_s,
                   wall_s=result.wall_s, peak_processes=result.peak_processes,
                   orphans_killed=result.orphans_killed, result=result.to_dict())
        table.append(row)

    base = next((r for r in table if r["loader"] == "torch" and r["num_workers"] == 0
                 and r["dataset"] == "plain" and not r.get("failure")), None)
    for r in table:
        r["ratio"] = (r["peak_pss_mb"] / base["peak_pss_mb"]) if base and not r.get("failure") else math.nan

    duration = time.perf_counter() - started
    command = " ".join(["python benchmarks/bench_memory.py", *args.argv])
    info = _measure.environment_info()
    print("## Memory benchmark: plain lists vs nostall.flat containers\n")
    print(f"Command: `{command}`  ")
    print(f"Machine: {info['usable_cpus']} CPUs, Python {info['python']}, torch {info['torch']}, "
          f"{info['platform']}  ")
    print(f"Dataset: {args.rows:,} annotation dicts, batch {args.batch_size}, {args.epochs} epochs, "
          f"torch {'transient' if args.torch_transient else 'persistent'} workers; duration {duration:.0f} s  ")
    print(f"Conversion: building the list {conversion['build_list_s']:.1f} s "
          f"(~{conversion['list_mb_estimate']:.0f} MB of Python objects), `flat(rows)` "
          f"{conversion['flat_s']:.1f} s -> `{conversion['flat_repr']}`\n")
    print(format_table(table))
    sys.stdout.flush()

    payload = {"command": command, "environment": info, "duration_s": duration,
               "arguments": {k: v for k, v in vars(args).items() if k != "argv"},
               "conversion": conversion,
               "rows": [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
                        for r in table]}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    _say(f"wrote {out}; benchmark took {duration:.0f} s")
    return 0 if all(not r.get("failure") for r in table) else 1


if __name__ == "__main__":
    sys.exit(main())
