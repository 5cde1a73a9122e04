"""The ``nostall`` command line.

Each subcommand is an ``add_parser(subparsers)`` function in its own module that
declares its arguments and sets ``func``; ``main`` only dispatches. A subcommand's
module is imported only when that subcommand runs (:data:`COMMANDS`), so
``nostall --help`` and ``nostall config`` start without importing torch. This
module parses and prints; measuring lives in :mod:`nostall.cli._measure`, datasets in
:mod:`nostall.cli._workloads`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from nostall._options import START_METHODS
from nostall._options import non_negative_int as _non_negative_int
from nostall._options import positive_int as _positive_int

GUIDE_FRAMES = 6400  # the guide's measured case: 6,400 training images, batch 32


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- #
# nostall demo
# --------------------------------------------------------------------------- #


def add_demo(subparsers: argparse._SubParsersAction) -> None:
    """Declare ``nostall demo``."""
    from nostall.cli._measure import LOADERS

    p = subparsers.add_parser(
        "demo",
        description=(
            "Run torch's DataLoader (transient and persistent workers) and nostall side by side "
            "on SpotGEO-like telescope frames, each configuration in a fresh process, and print "
            "time to first batch, the pauses between epochs, time per batch, throughput and "
            "peak memory. Frames are generated once and cached ($NOSTALL_CACHE or "
            "~/.cache/nostall)."
        ),
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument("--frames", type=_positive_int, default=640,
                      help="number of frames (default: %(default)s)")
    size.add_argument("--full", action="store_true",
                      help=f"the guide's size: {GUIDE_FRAMES:,} frames")
    p.add_argument("--epochs", type=_positive_int, default=3, help="default: %(default)s")
    p.add_argument("--batch-size", type=_positive_int, default=32, help="default: %(default)s")
    p.add_argument("--workers", type=_non_negative_int, nargs="+", default=[0, 2, 4],
                   metavar="N", help="num_workers values (default: 0 2 4)")
    p.add_argument("--start-method", nargs="+", choices=START_METHODS, default=["fork"],
                   dest="start_methods", help="start methods (default: fork)")
    p.add_argument("--loaders", nargs="+", choices=LOADERS, default=list(LOADERS),
                   help="loaders to compare (default: both)")
    p.add_argument("--step-ms", type=float, default=0.0,
                   help="simulated training step per batch, in ms of CPU (default: 0)")
    p.add_argument("--cache-dir", default=None, help="where frames are kept")
    p.add_argument("--timeout", type=float, default=900.0,
                   help="seconds allowed per configuration (default: %(default)s)")
    p.add_argument("--json", metavar="PATH", help="also write every figure as JSON to PATH")
    p.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    """Run ``nostall demo``; 0 when every configuration ran."""
    from nostall.cli import _bench, _measure
    from nostall.cli._measure import MeasureFailed, RunResult
    from nostall.cli._workloads import ensure_spotgeo

    frames = GUIDE_FRAMES if args.full else args.frames
    started = time.perf_counter()
    frames_dir = ensure_spotgeo(frames, args.cache_dir, progress=_say)
    _say(f"{frames} frames ready in {frames_dir}")

    loaders = list(args.loaders)
    if "nostall" in loaders and not _measure.nostall_available():
        _say("note: nostall.DataLoader is not importable here; showing torch's rows only.")
        loaders.remove("nostall")
    if not loaders:
        _say("nothing to run.")
        return 1

    specs = _measure.comparison_specs(
        workers=args.workers,
        start_methods=args.start_methods,
        loaders=loaders,
        workload="spotgeo",
        size=frames,
        batch_size=args.batch_size,
        epochs=args.epochs,
        step_ms=args.step_ms,
        cache_dir=args.cache_dir,
    )
    items = _bench.run_sweep(specs, args.timeout)

    print()
    print(f"SpotGEO-like frames: {frames}, batch size {args.batch_size}, {args.epochs} epochs, "
          f"{_measure.environment_info()['usable_cpus']} CPUs")
    print()
    print(_measure.format_table(items))
    print()
    print(f"demo finished in {time.perf_counter() - started:.0f} s")

    if args.json:
        payload = {
            "command": " ".join(["nostall", *args.argv]),
            "environment": _measure.environment_info(),
            "results": [i.to_dict() for i in items if isinstance(i, RunResult)],
            "failures": [{"spec": i.spec.to_dict(), "reason": i.reason, "output": i.output_tail}
                         for i in items if isinstance(i, MeasureFailed)],
        }
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2) + "\n")
        _say(f"wrote {path}")
    return 0 if all(isinstance(i, RunResult) for i in items) else 1


# --------------------------------------------------------------------------- #
# Entry point
# --------------------------------------------------------------------------- #

# name: (module, its function adding the subcommand, the line `nostall --help` shows).
# A module is imported only when its subcommand is the one run.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "demo": ("nostall.cli._main", "add_demo", "torch's DataLoader vs nostall on the SpotGEO-like workload"),
    "bench": ("nostall.cli._bench", "add_parser",
              "sweep num_workers / persistence / start methods for torch and nostall"),
    "tune": ("nostall.cli._tune", "add_parser",
             "find the best num_workers for nostall and for torch's DataLoader; write it as YAML"),
    "config": ("nostall.cli._config", "add_parser",
               "print a loader configuration template or check a configuration file"),
    "doctor": ("nostall.cli._doctor", "add_parser",
               "check this machine, a dataset and a training script for data-loading problems"),
}


class _SubcommandHelp:
    """``subparsers`` as a subcommand's ``add_parser`` sees it: the subcommand gets
    its line in ``nostall --help`` from :data:`COMMANDS`."""

    def __init__(self, subparsers: argparse._SubParsersAction, help_text: str):
        self._subparsers, self._help = subparsers, help_text

    def add_parser(self, name: str, **kwargs) -> argparse.ArgumentParser:
        return self._subparsers.add_parser(name, help=self._help, **kwargs)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``nostall`` parser. Only the subcommand named in ``argv`` is declared in
    full (its module imported); the others are listed with their help line. Without
    ``argv``, every subcommand is declared in full."""
    parser = argparse.ArgumentParser(
        prog="nostall",
        description="nostall: a DataLoader whose workers persist across epochs.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = next((a for a in argv if a in COMMANDS), None) if argv is not None else None
    for name, (module, add, help_text) in COMMANDS.items():
        if argv is None or name == chosen:
            getattr(importlib.import_module(module), add)(_SubcommandHelp(subparsers, help_text))
        else:
            subparsers.add_parser(name, help=help_text)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    args.argv = argv
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        _say("interrupted.")
        return 130


if __name__ == "__main__":
    sys.exit(main())
