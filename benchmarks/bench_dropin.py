#!/usr/bin/env python
"""Drop-in benchmark: is nostall ever slower than torch's DataLoader? (issue 11, section 5)

Question
    1. spawn, 8 workers, SpotGEO-like frames, batch 32, in a script that imports
       torch and its dataset module inside ``main()`` (CLIs, Hydra apps) and in one
       that imports them at the top: is nostall's steady time per batch <= 1.05x torch's,
       and its time to first batch <= 1/3 of torch's?
    2. Short runs (256 samples, batch 32, 3 epochs, fork, 2 persistent workers; PNG
       decode, 2 ms of numpy, a 10 ms sleep, 2,000,000 metadata dicts): is nostall's
       time to first batch <= torch's and its end-to-end samples/s >= 0.95x torch's?

Command
    .venv/bin/python benchmarks/bench_dropin.py --repeat 3 --out bench-results/bench_dropin.json

Method
    Every run is ``benchmarks/dropin_script.py`` in a fresh interpreter and session
    (``NOSTALL_BENCH_LAYOUT`` picks the layout), torch's DataLoader with
    ``persistent_workers=True`` and nostall with its defaults, interleaved: each
    round runs every configuration once, torch and nostall next to each other, and
    figures are medians over the rounds. Time to first batch: construction to the
    first batch. Time per batch: the mean interval between two batches inside an
    epoch; steady time per batch: after the first epoch, pauses included (see
    ``steady_batch_s``). Samples/s: every sample over construction to the last batch. CPU: the
    seconds the workers (every descendant) used until the loader was closed.

Output
    Markdown tables with the ratios and a held / not held verdict per target on
    stdout; every run's figures in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from nostall.cli import _measure
from nostall.cli._measure import RunResult

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "dropin_script.py"
EXTRA = ("main_cpu_s", "workers_cpu_s", "processes")


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", choices=("layouts", "short"), default=["layouts", "short"])
    p.add_argument("--repeat", type=int, default=3, help="rounds; figures are medians (default: %(default)s)")
    p.add_argument("--frames", type=int, default=1280, help="frames of the layouts part (default: %(default)s)")
    p.add_argument("--workers", type=int, default=8, help="workers of the layouts part (default: %(default)s)")
    p.add_argument("--short-size", type=int, default=256)
    p.add_argument("--datasets", nargs="+", default=["png", "numpy", "sleep", "dicts"])
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per run")
    p.add_argument("--out", default="bench-results/bench_dropin.json")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def specs(args) -> list[dict]:
    """Every configuration, torch then nostall for each case."""
    out = []
    if "layouts" in args.parts:
        for layout in ("inside", "top"):
            for loader in ("torch", "nostall"):
                out.append({"part": "layouts", "layout": layout, "loader": loader, "dataset": "png",
                            "size": args.frames, "num_workers": args.workers, "start_method": "spawn",
                            "epochs": 3, "batch_size": 32})
    if "short" in args.parts:
        for dataset in args.datasets:
            for loader in ("torch", "nostall"):
                out.append({"part": "short", "layout": "top", "loader": loader, "dataset": dataset,
                            "size": args.short_size, "num_workers": 2, "start_method": "fork",
                            "epochs": 3, "batch_size": 32})
    return out


def run_one(spec: dict, timeout: float) -> dict:
    """One run of ``dropin_script.py`` in a fresh session; its JSON figures."""
    env = dict(os.environ, NOSTALL_BENCH_LAYOUT=spec["layout"])
    src = str(HERE.parent / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
    proc = subprocess.Popen([sys.executable, str(SCRIPT), json.dumps(spec)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _measure._kill_session(proc.pid)
        proc.communicate()
        raise RuntimeError(f"{label(spec)}: timed out after {timeout:.0f} s") from None
    finally:
        _measure._kill_session(proc.pid, grace_s=3.0)
    lines = [s for s in out.splitlines() if s.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{label(spec)}: exit status {proc.returncode}\n{err[-3000:]}")
    return json.loads(lines[-1])


def label(spec: dict) -> str:
    return (f"{spec['part']}: {spec['dataset']} {spec['loader']} {spec['start_method']} "
            f"{spec['num_workers']} workers, imports {'inside main()' if spec['layout'] == 'inside' else 'at top'}")


def steady_batch_s(run: dict) -> float:
    """Seconds per batch after the first epoch, pauses between epochs included: from
    the last batch of epoch 0 to the last batch of the run, over the batches between.
    The mean interval inside epochs leaves the pauses out, and a loader that pauses
    at a boundary makes batches meanwhile that then arrive back to back (torch's
    persistent workers refill 2 batches per worker at each ``iter()``): the training
    loop waits the pause all the same."""
    timeline = run.get("timeline_s") or []
    if len(timeline) < 2 or not timeline[0]:
        return math.nan
    batches = sum(len(ep) for ep in timeline[1:])
    return (timeline[-1][-1] - timeline[0][-1]) / batches if batches else math.nan


def time_to_first_batch_s(run: dict) -> float:
    return run["time_to_first_batch_s"]


def samples_per_s(run: dict) -> float:
    return run["samples_per_s"]


def combine(runs: list[dict]) -> dict:
    """Medians over repeated runs (RunResult fields and the CPU figures)."""
    result = _measure.median_of_runs([RunResult.from_dict({k: v for k, v in r.items() if k not in EXTRA
                                                          and k != "max_pause_s"}) for r in runs])
    out = result.to_dict()
    for key in EXTRA:
        values = [r[key] for r in runs if r.get(key) is not None]
        out[key] = statistics.median(values) if values else None
    out["steady_batch_s"] = statistics.median(steady_batch_s(r) for r in runs)
    out["runs"] = runs
    return out


def _r(a, b) -> float:
    return a / b if a is not None and b and not math.isnan(a) else math.nan


def verdicts(args, results: list[tuple[dict, dict]]) -> list[dict]:
    """One row per target: the ratio, nostall's and torch's figures, held or not."""
    by = {(s["part"], s["layout"], s["dataset"], s["loader"]): r for s, r in results}
    rows = []

    def add(target, case, figure, ns_result, tr_result, limit, lower=True):
        # Each round ran torch then nostall back to back: the ratio within a round is
        # what the machine's drift spoils least; the verdict takes their median.
        paired = [_r(figure(a), figure(b)) for a, b in zip(ns_result["runs"], tr_result["runs"])]
        value = statistics.median(paired)
        ns, tr = ns_result[figure.__name__], tr_result[figure.__name__]
        held = (value <= limit) if lower else (value >= limit)
        rows.append({"target": target, "case": case, "ratio": value, "paired": paired,
                     "ratio_of_medians": _r(ns, tr), "nostall": ns, "torch": tr,
                     "limit": limit, "held": bool(held and not math.isnan(value))})

    if "layouts" in args.parts:
        for layout in ("inside", "top"):
            ns, tr = by.get(("layouts", layout, "png", "nostall")), by.get(("layouts", layout, "png", "torch"))
            if not (ns and tr):
                continue
            case = f"spawn, {args.workers} workers, imports {'inside main()' if layout == 'inside' else 'at top'}"
            add("steady time per batch <= 1.05x torch's", case, steady_batch_s, ns, tr, 1.05)
            add("time to first batch <= 1/3 of torch's", case, time_to_first_batch_s, ns, tr, 1 / 3)
    if "short" in args.parts:
        for dataset in args.datasets:
            ns, tr = by.get(("short", "top", dataset, "nostall")), by.get(("short", "top", dataset, "torch"))
            if not (ns and tr):
                continue
            case = f"{dataset}, {args.short_size} samples, fork, 2 workers"
            add("time to first batch <= torch's", case, time_to_first_batch_s, ns, tr, 1.0)
            add("samples/s >= 0.95x torch's", case, samples_per_s, ns, tr, 0.95, lower=False)
    return rows


def _f(v, digits=3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.{digits}f}"


def report(args, results, rows, duration: float) -> str:
    env = _measure.environment_info()
    lines = ["## Drop-in benchmark: nostall vs torch's DataLoader\n",
             f"Command: `python benchmarks/bench_dropin.py {' '.join(args.argv)}`  ",
             f"Machine: {env['usable_cpus']} CPUs, Python {env['python']}, torch {env['torch']}  ",
             f"Duration: {duration:.0f} s, figures are medians of {args.repeat} interleaved rounds\n",
             "| case | loader | imports | time to first batch (s) | steady time per batch (s) | "
             "time per batch in epochs (s) | samples/s | pauses (s) | workers' CPU (s) |",
             "|---|---|---|---:|---:|---:|---:|---|---:|"]
    for spec, r in results:
        where = "inside main()" if spec["layout"] == "inside" else "at top"
        case = (f"{spec['dataset']}, {spec['start_method']}, {spec['num_workers']} workers, "
                f"{spec['size']} samples")
        lines.append(f"| {case} | {spec['loader']} | {where} | {_f(r['time_to_first_batch_s'])} | "
                     f"{_f(r['steady_batch_s'], 4)} | {_f(r['mean_batch_s'], 4)} | {_f(r['samples_per_s'])} | "
                     f"{_measure.format_pauses(r['epoch_pauses_s'])} | {_f(r.get('workers_cpu_s'), 2)} |")
    lines += ["", "nostall / torch: the median of the rounds' ratios (torch and nostall ran back to back in "
              "each round); the ratio of the medians above beside it.", "",
              "| target | case | nostall / torch | each round | ratio of medians | nostall | torch | verdict |",
              "|---|---|---:|---|---:|---:|---:|---|"]
    for row in rows:
        lines.append(f"| {row['target']} | {row['case']} | {_f(row['ratio'])} | "
                     f"{', '.join(_f(v, 2) for v in row['paired'])} | {_f(row['ratio_of_medians'])} | "
                     f"{_f(row['nostall'], 4)} | {_f(row['torch'], 4)} | {'held' if row['held'] else 'NOT HELD'} |")
    held = sum(r["held"] for r in rows)
    lines.append(f"\n{held} of {len(rows)} targets held.")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    from nostall.cli._workloads import ensure_spotgeo

    ensure_spotgeo(max(args.frames, args.short_size), progress=_say)
    todo = specs(args)
    runs: dict[int, list[dict]] = {i: [] for i in range(len(todo))}
    failures = []
    for round_no in range(args.repeat):
        for i, spec in enumerate(todo):
            _say(f"[round {round_no + 1}/{args.repeat}, {i + 1}/{len(todo)}] {label(spec)} ...")
            try:
                r = run_one(spec, args.timeout)
            except RuntimeError as exc:
                _say(f"    FAILED: {exc}")
                failures.append(str(exc))
                continue
            runs[i].append(r)
            _say(f"    first batch {_f(r['time_to_first_batch_s'])} s, steady {_f(steady_batch_s(r), 4)} s/batch "
                 f"(in epochs {_f(r['mean_batch_s'], 4)}), "
                 f"{_f(r['samples_per_s'])} samples/s, workers' CPU {_f(r.get('workers_cpu_s'), 2)} s")
    results = [(spec, combine(runs[i])) for i, spec in enumerate(todo) if runs[i]]
    rows = verdicts(args, results)
    duration = time.perf_counter() - started
    print(report(args, results, rows, duration), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"arguments": {k: v for k, v in vars(args).items()}, "duration_s": duration,
                               "results": [{**r, "spec": s} for s, r in results],
                               "targets": [{k: (None if isinstance(v, float) and math.isnan(v) else v)
                                            for k, v in row.items()} for row in rows],
                               "failures": failures}, indent=1) + "\n")
    _say(f"wrote {out}; took {duration:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
