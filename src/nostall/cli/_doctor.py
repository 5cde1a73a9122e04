"""``nostall doctor``: find the data-loading settings that make training slow,
grow memory or crash, on this machine and (optionally) for a dataset and a script.

Each check is a small function with explicit parameters that returns
:class:`Finding` objects (what was found, with the numbers measured, and the
fix); :func:`run_doctor` runs them all and :func:`format_report` prints them.
:func:`add_parser` / :func:`run` are the ``nostall doctor`` command line.
CPU counts come from :mod:`nostall.observe._cpus` (affinity and cgroup quota).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import itertools
import json
import math
import os
import sys
import textwrap
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from ..observe._cpus import UsableCpus, usable_cpus
from ..containers._large_containers import (  # noqa: F401  (re-exported: the doctor's API)
    CONTAINERS, MIN_ELEMENTS, Container, _attributes, _NOT_DATA, estimate_size, find_large_containers,
)
from ..workers._limits import FDS_BASE, FDS_LOADER, FDS_PER_WORKER, open_files_needed
from .._options import START_METHODS, int_from, non_negative_int, positive_int
from ..observe._script import is_loader_call, parse_script, resolve_start_method, unguarded_uses

__all__ = [
    "Finding",
    "add_parser",
    "check_copy_on_read",
    "check_cpus",
    "check_dev_shm",
    "check_main_guard",
    "check_open_files",
    "check_persistent",
    "check_pin_memory",
    "check_threads",
    "format_report",
    "run",
    "run_doctor",
]

SEVERITIES = ("problem", "warning", "ok")
_MB = 1024.0 * 1024.0
_GB = 1024.0 * _MB


@dataclass(frozen=True)
class Finding:
    """One result of a check: what was found (with numbers) and, unless ``ok``, the fix."""

    severity: str  # "problem" | "warning" | "ok"
    check: str  # short id: "cpus", "persistent", "pin_memory", ...
    found: str
    fix: str = ""

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"`severity` must be one of {SEVERITIES}; got {self.severity!r}.")

    def to_dict(self) -> dict[str, str]:
        """The finding as a JSON-ready dict."""
        return dataclasses.asdict(self)


def _mb(nbytes: float) -> str:
    if nbytes < _MB:
        return f"{nbytes / 1024:,.0f} KB"
    return f"{nbytes / _MB:,.1f} MB" if nbytes < 10 * _MB else f"{nbytes / _MB:,.0f} MB"


def _num(value: float) -> str:
    """2 for 2.0, 1.5 for 1.5: CPU counts may be fractional under a cgroup quota."""
    return f"{value:g}"


def default_num_workers(cpus: UsableCpus) -> int:
    """What ``nostall doctor`` checks when ``--num-workers`` is not given: the usable CPUs."""
    return max(1, math.floor(cpus.count))


# --------------------------------------------------------------------------- #
# Checks of the loader's arguments
# --------------------------------------------------------------------------- #


def check_cpus(num_workers: int, cpus: UsableCpus) -> list[Finding]:
    """More worker processes than CPUs this process may use."""
    if num_workers <= cpus.count:
        return [Finding("ok", "cpus", f"num_workers={num_workers} fits the {_num(cpus.count)} usable CPUs "
                                      f"({cpus.source}).")]
    most = max(1, math.floor(cpus.count))
    fix = f"Pass num_workers={most}"
    if most > 1:
        fix += f" or fewer (num_workers={most - 1} leaves one CPU to the training loop)"
    return [Finding(
        "problem", "cpus",
        f"num_workers={num_workers} but only {_num(cpus.count)} CPUs are usable ({cpus.source}). The "
        f"{num_workers} workers time-share those CPUs with each other and with the training loop: "
        "no more batches per second, and every extra worker costs memory and start-up time.",
        fix + ".",
    )]


def check_persistent(num_workers: int, persistent: bool) -> list[Finding]:
    """Workers started again at every epoch."""
    if num_workers == 0:
        return [Finding("ok", "persistent", "num_workers=0: no worker processes to keep.")]
    if persistent:
        return [Finding("ok", "persistent", f"persistent workers: the {num_workers} workers are started "
                                            "once and kept across epochs.")]
    return [Finding(
        "warning", "persistent",
        f"persistent_workers=False: the {num_workers} workers are shut down at the end of every epoch "
        "and started again (process start, dataset copy, worker_init_fn) at the next, a pause at "
        "every epoch boundary.",
        "Pass persistent_workers=True (nostall.DataLoader's default when num_workers > 0).",
    )]


def check_pin_memory(pin_memory: bool, accelerator: str | None) -> list[Finding]:
    """pin_memory=True on a machine with no accelerator to copy batches to."""
    from ..core._torch_versions import has_accelerator_api

    probe = "torch.accelerator.is_available()" if has_accelerator_api() else "torch.cuda.is_available()"
    if not pin_memory:
        note = f" ({accelerator} available: with pin_memory=True and .to(device, non_blocking=True) " \
               "host-to-device copies overlap compute)" if accelerator else ""
        return [Finding("ok", "pin_memory", f"pin_memory=False{note}.")]
    if accelerator:
        return [Finding("ok", "pin_memory", f"pin_memory=True and a {accelerator} device is available.")]
    return [Finding(
        "warning", "pin_memory",
        f"pin_memory=True but this machine has no accelerator ({probe} is False): torch and nostall "
        "skip pinning and warn \"'pin_memory' argument is set as true but no accelerator is found\"; "
        "the setting does nothing here.",
        "Pass pin_memory=torch.cuda.is_available() (or pin_memory=False on CPU-only machines).",
    )]


# --------------------------------------------------------------------------- #
# The __main__ guard of a training script
# --------------------------------------------------------------------------- #


def check_main_guard(script: str | Path, start_method: str, method_source: str = "") -> list[Finding]:
    """A script that would start workers while spawned workers re-import it."""
    path = Path(script)
    tree = parse_script(path)
    starts, creates = unguarded_uses(tree)
    listed = "; ".join(text for _, text in sorted(starts + creates))
    method = f"start method {start_method}" + (f" ({method_source})" if method_source else "")
    guard = 'if __name__ == "__main__":'
    fix = (f"Move that code into a function and call it under the guard at the end of {path.name}:\n"
           f"    {guard}\n        main()")
    if start_method == "fork":
        note = ""
        if starts or creates:
            outcome = "fail" if starts else "rebuild the loader in every worker"
            note = (f" Under spawn or forkserver (macOS's default, and Linux's from Python 3.14) it would "
                    f"{outcome}: outside `{guard}`, {listed}.")
        return [Finding("ok", "main_guard", f"{path.name}: {method} forks workers without re-importing "
                                            f"the script, so no guard is needed.{note}")]
    why = (f"{path.name} runs with {method}: new worker processes (torch's workers, nostall's worker "
           f"factory) start by re-importing {path.name}, which runs everything outside `{guard}` again.")
    if starts:
        return [Finding(
            "problem", "main_guard",
            f"{why} Outside the guard, {listed}. Re-imported in a worker, that starts workers of its own "
            "and fails with \"RuntimeError: An attempt has been made to start a new process before the "
            "current process has finished its bootstrapping phase\".",
            fix + "\nor, on Linux, pass multiprocessing_context=\"fork\".",
        )]
    if creates:
        return [Finding(
            "warning", "main_guard",
            f"{why} Outside the guard, {listed}: every worker builds that loader and its dataset again "
            "when it starts (start-up time and memory), and any loop over it outside the guard would fail.",
            fix,
        )]
    found = f"{path.name}: no DataLoader is created or iterated outside `{guard}` ({method})."
    if not any(is_loader_call(n) for n in ast.walk(tree)):
        found += " (No DataLoader(...) call found in it: a loader built in another module is not checked.)"
    return [Finding("ok", "main_guard", found)]


# --------------------------------------------------------------------------- #
# The dataset: copy-on-read containers and one batch's size
# --------------------------------------------------------------------------- #


def check_copy_on_read(dataset: Any, num_workers: int, start_method: str,
                       min_elements: int = MIN_ELEMENTS, available_bytes: int | None = None) -> list[Finding]:
    """Large Python lists/dicts on the dataset, which every worker ends up copying."""
    containers = find_large_containers(dataset, min_elements)
    if not containers:
        return [Finding("ok", "copy_on_read", f"No list, dict, tuple or set on the dataset "
                                              f"({type(dataset).__name__}) holds {min_elements:,} or more "
                                              "elements.")]
    if num_workers == 0:
        listed = ", ".join(f"{c.path} (~{_mb(c.nbytes)})" for c in containers)
        return [Finding("ok", "copy_on_read", f"num_workers=0: {listed} stays in one process, no copies.")]
    if available_bytes is None:
        import psutil

        available_bytes = psutil.virtual_memory().available
    total = sum(c.nbytes for c in containers) * num_workers
    how = ("Forked workers share it at first, but reading an element updates its reference count, which "
           "copies the memory page it sits on into the reading worker"
           if start_method == "fork" else
           f"With {start_method}, torch's workers each unpickle their own copy of the dataset (nostall's "
           "workers, forked from one copy, copy it page by page as reading updates reference counts)")
    growth = ", growing during the first epoch like a leak" if start_method == "fork" else ""
    findings = []
    for c in containers:
        severity = "problem" if total > available_bytes else "warning"
        found = (f"{c.path} is a {c.kind} of {c.count:,} Python objects taking ~{_mb(c.nbytes)} (estimated "
                 f"with sys.getsizeof). {how}: expect up to ~{_mb(c.nbytes)} more memory "
                 f"per worker, ~{_mb(c.nbytes * num_workers)} over {num_workers} workers{growth} "
                 "(pytorch/pytorch#13246).")
        if severity == "problem":
            found += (f" All large containers together: ~{_mb(total)} over {num_workers} workers, more than "
                      f"the {_mb(available_bytes)} of memory available.")
        attr = c.path.split(".", 1)[1] if c.path.startswith("dataset.") else c.path
        fix = (f"Hold {c.path} in a few flat buffers instead of {c.count:,} Python objects, one line in "
               f"the dataset's __init__: `self.{attr} = nostall.flat(self.{attr})` (lists of str, numbers "
               "or same-keyed dicts; items come back as fresh Python objects). Flat buffers hold no "
               "per-item Python object, so reading them copies nothing, and under spawn they reach the "
               "workers as shared memory.")
        findings.append(Finding(severity, "copy_on_read", found, fix))
    return findings


class BatchInfo(NamedTuple):
    """One collated batch: bytes in tensors (what crosses /dev/shm) and the number of tensors."""

    nbytes: int
    tensors: int
    samples: int


def measure_batch(dataset: Any, batch_size: int) -> BatchInfo:
    """Collate the first ``batch_size`` samples with torch's ``default_collate`` and size it."""
    import torch
    from torch.utils.data import IterableDataset, default_collate

    if isinstance(dataset, IterableDataset):
        samples = list(itertools.islice(iter(dataset), batch_size))
    else:
        samples = [dataset[i] for i in range(min(batch_size, len(dataset)))]
    if not samples:
        raise ValueError("the dataset is empty")
    tensors = [t for t in _leaves(default_collate(samples)) if isinstance(t, torch.Tensor)]
    return BatchInfo(sum(t.numel() * t.element_size() for t in tensors), len(tensors), len(samples))


def _leaves(obj: Any):
    if isinstance(obj, Mapping):
        for v in obj.values():
            yield from _leaves(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _leaves(v)
    else:
        yield obj


# --------------------------------------------------------------------------- #
# Machine limits: /dev/shm, open files, threads
# --------------------------------------------------------------------------- #


def check_dev_shm(num_workers: int, prefetch_factor: int, batch_bytes: int | None,
                  path: str = "/dev/shm") -> list[Finding]:
    """Shared memory too small for the batches in flight (torch passes worker batches through it)."""
    try:
        st = os.statvfs(path)
    except OSError as exc:
        if not sys.platform.startswith("linux"):
            return [Finding("ok", "dev_shm", f"No {path} here ({sys.platform}); not checked.")]
        return [Finding("problem", "dev_shm", f"Cannot read {path} ({exc.strerror}): worker processes pass "
                        "batches through shared memory there.",
                        "Mount a tmpfs at /dev/shm (docker: `docker run --shm-size=2g ...`).")]
    free, size = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
    where = f"{path} has {_mb(free)} free of {_mb(size)}"
    if num_workers == 0:
        return [Finding("ok", "dev_shm", f"num_workers=0: batches do not go through {path} ({where}).")]
    docker = ("`docker run --shm-size={size}g ...` (docker's default is 64 MB; Kubernetes: mount an "
              "emptyDir volume with medium: Memory at /dev/shm)")
    if batch_bytes is None:
        if free >= 512 * _MB:
            return [Finding("ok", "dev_shm", f"{where} (pass --dataset to compare it with your batches).")]
        return [Finding("warning", "dev_shm",
                        f"{where}: less than 512 MB for the batches in flight. A batch of 32 RGB 224x224 "
                        f"float32 images is {_mb(32 * 3 * 224 * 224 * 4)}; ({num_workers} workers x "
                        f"prefetch_factor {prefetch_factor} + 1) such batches need "
                        f"{_mb((num_workers * prefetch_factor + 1) * 32 * 3 * 224 * 224 * 4)}. "
                        "Pass --dataset to measure your own.",
                        "Give the container more: " + docker.format(size=2) + ".")]
    from nostall.workers._transport import INLINE_BYTES

    in_flight = num_workers * prefetch_factor + 1  # +1: the batch the training loop holds
    needed = in_flight * batch_bytes
    found = (f"Batches in flight need ~{_mb(needed)} of shared memory (({num_workers} workers x "
             f"prefetch_factor {prefetch_factor} + 1 in the training loop) x {_mb(batch_bytes)} per batch, "
             f"measured by collating one batch) and {where}. torch's DataLoader passes every tensor from a "
             f"worker through it (nostall only those over {INLINE_BYTES // 1024} KB).")
    if needed <= free / 2:
        return [Finding("ok", "dev_shm", found)]
    fits = [f"num_workers={w}" for w in [math.floor((free / 2 / batch_bytes - 1) / prefetch_factor)] if w >= 1]
    fits += [f"prefetch_factor={p}" for p in [math.floor((free / 2 / batch_bytes - 1) / num_workers)] if p >= 1]
    fewer = " or ".join(fits) + " (to use under half of it)" if fits else "a smaller batch_size"
    fix = (f"Give the container more shared memory: {docker.format(size=math.ceil(2 * needed / _GB))}; "
           f"or keep fewer batches in flight: {fewer}.")
    if needed > free:
        return [Finding("problem", "dev_shm", found + " Workers will fail with \"No space left on device\" or "
                        "\"Unexpected bus error encountered in worker\".", fix)]
    return [Finding("warning", "dev_shm", found + " Over half of it: a second loader (validation) or "
                    "another job sharing it can run it out.", fix)]


def check_open_files(num_workers: int, prefetch_factor: int, tensors_per_batch: int | None,
                     limits: tuple[int, int] | None = None) -> list[Finding]:
    """An open-files limit too low for workers' pipes and shared tensors."""
    import resource

    soft, hard = limits if limits is not None else resource.getrlimit(resource.RLIMIT_NOFILE)
    if num_workers == 0:
        return [Finding("ok", "open_files", f"num_workers=0: no worker pipes or shared tensors "
                                            f"(open-files limit {_limit(soft)}).")]
    counted = tensors_per_batch is not None
    tensors = tensors_per_batch if counted else 2
    needed = open_files_needed(num_workers, prefetch_factor, tensors)
    estimate = (f"~{needed:,} (estimate: {FDS_BASE} for the process itself (assumed; the loader counts what is "
                f"open when it starts) + {FDS_LOADER} for the loader + {FDS_PER_WORKER} per worker x {num_workers} "
                f"+ {tensors} tensors per batch{'' if counted else ' (assumed; pass --dataset to count)'} "
                f"x {num_workers * prefetch_factor + 1} batches in flight or held, one descriptor per shared "
                "tensor under torch's default 'file_descriptor' sharing)")
    if soft == resource.RLIM_INFINITY or soft >= 2 * needed:
        return [Finding("ok", "open_files", f"Open-files limit {_limit(soft)}; the loader needs {estimate}.")]
    want = max(4096, 4 * needed)
    fix = f"Raise the limit in the shell that starts training: `ulimit -n {want}`"
    if hard != resource.RLIM_INFINITY and hard < want:
        fix += (f" (the hard limit is {hard:,}: raise it in /etc/security/limits.conf, or "
                f"`docker run --ulimit nofile={want}:{want}`)")
    fix += ("; or call torch.multiprocessing.set_sharing_strategy('file_system') in the training script, "
            "which needs no descriptor per tensor.")
    found = (f"Open-files limit (ulimit -n) is {soft:,}; the loader needs {estimate}, more if your code keeps "
             "batches (each kept tensor from a worker holds a descriptor).")
    if soft < needed:
        return [Finding("problem", "open_files", found + " Expect \"Too many open files\" or "
                        "\"received 0 items of ancdata\".", fix)]
    return [Finding("warning", "open_files", found + " Less than twice that: little headroom.", fix)]


def _limit(value: int) -> str:
    import resource

    return "unlimited" if value == resource.RLIM_INFINITY else f"{value:,}"


THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def check_threads(num_workers: int, cpus: UsableCpus, env: Mapping[str, str] | None = None,
                  main_threads: int | None = None, opencv_loaded: bool | None = None) -> list[Finding]:
    """Threads per worker times workers above the usable CPUs.

    torch and nostall call ``torch.set_num_threads(1)`` in every worker, so the risk is
    other libraries in the dataset or ``worker_init_fn`` that size their thread pools
    from OMP_NUM_THREADS & co., or from the CPU count when those are unset.
    """
    import torch

    env = os.environ if env is None else env
    main_threads = torch.get_num_threads() if main_threads is None else main_threads
    opencv_loaded = "cv2" in sys.modules if opencv_loaded is None else opencv_loaded
    cpu_text = f"{_num(cpus.count)} usable CPUs"
    context = (f"torch and nostall run torch ops in each worker on 1 thread (they call "
               f"torch.set_num_threads(1) there); the training process uses {main_threads} torch threads "
               "(torch.get_num_threads())")
    if num_workers == 0:
        return [Finding("ok", "threads", f"num_workers=0; the training process uses {main_threads} torch "
                                         f"threads on {cpu_text}.")]
    settings: dict[str, int] = {}
    for name in THREAD_VARS:
        if env.get(name):
            try:
                settings[name] = int(env[name])
            except ValueError:
                return [Finding("warning", "threads", f"{name}={env[name]!r} is not a whole number; "
                                "libraries ignore it or fail.", f"export {name}=1 (or unset it).")]
    fix = ("Limit threads inside the workers: a worker_init_fn that calls threadpoolctl.threadpool_limits(1) "
           "(numpy's BLAS) and cv2.setNumThreads(1) (OpenCV). Setting OMP_NUM_THREADS for the whole job "
           "would also cap the training process's torch threads.")
    if settings:
        per_worker = max(settings.values())
        shown = " ".join(f"{k}={v}" for k, v in settings.items())
        if per_worker * num_workers <= cpus.count:
            return [Finding("ok", "threads", f"{shown}: {per_worker} x {num_workers} workers fits {cpu_text}; "
                                             f"{context}.")]
        share = max(1, math.floor(cpus.count) // num_workers)
        return [Finding(
            "warning", "threads",
            f"{shown} is inherited by the {num_workers} workers. {context}; but "
            "libraries in your dataset or worker_init_fn that read these variables (numpy's BLAS, OpenCV, "
            f"numba) can run {per_worker} threads in each worker: {per_worker} x {num_workers} = "
            f"{per_worker * num_workers} threads for {cpu_text}.",
            fix + " Or: export " + " ".join(f"{k}={share}" for k in settings) + ".",
        )]
    per_cpu = max(1, math.floor(cpus.count))
    if opencv_loaded and num_workers * per_cpu > cpus.count:
        return [Finding(
            "warning", "threads",
            f"OpenCV (cv2) is imported and {', '.join(THREAD_VARS)} are unset: OpenCV runs one thread per CPU "
            f"in each worker, {num_workers} x {per_cpu} = {num_workers * per_cpu} threads for {cpu_text} "
            f"({context}).",
            fix,
        )]
    return [Finding("ok", "threads", f"{', '.join(THREAD_VARS)} unset; {context}. (numpy linear algebra in "
                                     "the dataset, or a worker_init_fn raising thread counts, would run one "
                                     "thread per CPU in each worker.)")]


# --------------------------------------------------------------------------- #
# All checks
# --------------------------------------------------------------------------- #


def run_doctor(*, num_workers: int | None = None, start_method: str | None = None, persistent: bool = True,
               pin_memory: bool = False, batch_size: int = 32, prefetch_factor: int = 2,
               dataset: Any = None, script: str | Path | None = None,
               cpus: UsableCpus | None = None) -> list[Finding]:
    """Run every check that applies and return the findings, in check order.

    ``num_workers=None`` checks the usable CPU count; ``start_method=None`` the one
    the script sets, else the platform's default. ``dataset`` enables the copy-on-read
    check and measures one batch; ``script`` enables the ``__main__`` guard check.
    """
    from ..core._torch_versions import accelerator

    cpus = usable_cpus() if cpus is None else cpus
    num_workers = default_num_workers(cpus) if num_workers is None else num_workers
    for name, value, least in (("num_workers", num_workers, 0), ("batch_size", batch_size, 1),
                               ("prefetch_factor", prefetch_factor, 1)):
        if not int_from(least)(value):
            raise ValueError(f"--{name.replace('_', '-')} must be an int >= {least}; got {value!r}.")
    method, method_source = resolve_start_method(start_method, script)
    findings = check_cpus(num_workers, cpus) + check_persistent(num_workers, persistent)
    findings += check_pin_memory(pin_memory, accelerator())
    if script is not None:
        findings += check_main_guard(script, method, method_source)
    batch: BatchInfo | None = None
    if dataset is not None:
        findings += check_copy_on_read(dataset, num_workers, method)
        try:
            batch = measure_batch(dataset, batch_size)
        except Exception as exc:  # noqa: BLE001 - the user's dataset: report any error, do not crash
            findings.append(Finding(
                "warning", "batch",
                f"Could not collate the first {batch_size} samples with torch's default_collate "
                f"({type(exc).__name__}: {exc}); /dev/shm and open files are checked without your batch size.",
                "If your loader passes a collate_fn, that is expected; otherwise make samples the same shape "
                "(or pass collate_fn to your DataLoader).",
            ))
    findings += check_dev_shm(num_workers, prefetch_factor, batch.nbytes if batch else None)
    findings += check_open_files(num_workers, prefetch_factor, batch.tensors if batch else None)
    findings += check_threads(num_workers, cpus)
    return findings


def format_report(findings: Sequence[Finding], header: Sequence[str] = (), width: int = 100) -> str:
    """Text report: problems first, one block per finding (``[severity] check``, found, fix)."""
    order = {s: i for i, s in enumerate(SEVERITIES)}
    lines = [*header, ""] if header else []
    for f in sorted(findings, key=lambda f: order[f.severity]):
        lines.append(f"[{f.severity}] {f.check}")
        lines += _block("  found: ", f.found, width)
        if f.fix:
            lines += _block("  fix:   ", f.fix, width)
        lines.append("")
    counts = Counter(f.severity for f in findings)
    lines.append(f"{counts['problem']} problem(s), {counts['warning']} warning(s), {counts['ok']} ok")
    return "\n".join(lines)


def _block(label: str, text: str, width: int) -> list[str]:
    """``label`` then ``text`` wrapped under it; lines starting with spaces (code) kept as they are."""
    indent = " " * len(label)
    out = []
    for i, para in enumerate(text.split("\n")):
        first = label if i == 0 else indent
        if para.startswith(" "):
            out.append(indent + para)
        else:
            out += textwrap.wrap(para, width, initial_indent=first, subsequent_indent=indent,
                                 break_long_words=False, break_on_hyphens=False) or [first.rstrip()]
    return out


# --------------------------------------------------------------------------- #
# nostall doctor
# --------------------------------------------------------------------------- #


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``doctor`` subcommand to ``subparsers``; it runs :func:`run`."""
    p = subparsers.add_parser(
        "doctor",
        description=(
            "Check this machine (usable CPUs, /dev/shm, open-files limit, threads) and the loader "
            "settings you pass, and optionally your dataset (--dataset) and training script (--script); "
            "print each finding with the fix. Exit status: 0 no problems, 1 problems found, 2 bad arguments."
        ),
    )
    p.add_argument("--dataset", metavar="MODULE:FACTORY",
                   help="a function returning your dataset, importable from the current directory: checks it "
                        "for large Python containers and measures one batch")
    p.add_argument("--script", metavar="PATH",
                   help="your training script: checked for the `if __name__ == \"__main__\":` guard that "
                        "spawn and forkserver need")
    p.add_argument("--num-workers", type=non_negative_int, default=None, metavar="N",
                   help="your loader's num_workers (default: the number of usable CPUs here)")
    p.add_argument("--start-method", choices=START_METHODS, default=None,
                   help="your loader's start method (default: the one --script sets, else the platform's)")
    p.add_argument("--no-persistent", dest="persistent", action="store_false",
                   help="your loader has persistent_workers=False")
    p.add_argument("--pin-memory", action="store_true", help="your loader has pin_memory=True")
    p.add_argument("--batch-size", type=positive_int, default=32, help="default: %(default)s")
    p.add_argument("--prefetch-factor", type=positive_int, default=2, help="default: %(default)s")
    p.add_argument("--json", metavar="PATH", help="also write the findings as JSON to PATH")
    p.set_defaults(func=run)
    return p


def _load_dataset(text: str) -> Any:
    from nostall.cli._resolve import call_factory

    try:
        return call_factory(text, "--dataset")
    except Exception as exc:
        if isinstance(exc, ValueError) and str(exc).startswith("--dataset"):
            raise  # call_factory's own message (bad reference, import error) says it all
        module, _, attr = text.partition(":")
        raise ValueError(f"--dataset: {text}() raised {type(exc).__name__}: {exc}. Fix the factory; run it "
                         f"alone to see the traceback: python -c \"import {module}; {module}.{attr}()\"") from exc


def run(args: argparse.Namespace) -> int:
    """``nostall doctor``: print the report; 0 without problems, 1 with, 2 for bad arguments."""
    cpus = usable_cpus()
    num_workers = default_num_workers(cpus) if args.num_workers is None else args.num_workers
    try:
        dataset = _load_dataset(args.dataset) if args.dataset else None
        method, method_source = resolve_start_method(args.start_method, args.script)  # for the header
        findings = run_doctor(num_workers=num_workers, start_method=args.start_method,
                              persistent=args.persistent, pin_memory=args.pin_memory,
                              batch_size=args.batch_size, prefetch_factor=args.prefetch_factor,
                              dataset=dataset, script=args.script, cpus=cpus)
    except ValueError as exc:
        print(f"nostall doctor: {exc}", file=sys.stderr)
        return 2
    config = {"num_workers": num_workers, "start_method": method, "persistent": args.persistent,
              "pin_memory": args.pin_memory, "batch_size": args.batch_size,
              "prefetch_factor": args.prefetch_factor, "dataset": args.dataset, "script": args.script}
    header = [
        f"nostall doctor: {_num(cpus.count)} usable CPUs ({cpus.source})",
        f"checked: num_workers={num_workers}"
        + (" (default: the usable CPUs; pass --num-workers)" if args.num_workers is None else "")
        + f", start method {method} ({method_source}), persistent_workers={args.persistent}, "
          f"pin_memory={args.pin_memory}, batch_size={args.batch_size}, prefetch_factor={args.prefetch_factor}",
    ]
    if dataset is not None:
        size = f" with {len(dataset):,} samples" if hasattr(dataset, "__len__") else ""
        header.append(f"dataset: {args.dataset} -> {type(dataset).__name__}{size}")
    skipped = [what for what, given in (("copy-on-read (pass --dataset)", args.dataset),
                                        ("__main__ guard (pass --script)", args.script)) if not given]
    if skipped:
        header.append("not checked: " + ", ".join(skipped))
    print(format_report(findings, header))
    if args.json:
        payload = {
            "usable_cpus": cpus._asdict(),
            "config": config,
            "findings": [f.to_dict() for f in findings],
            "problems": sum(f.severity == "problem" for f in findings),
            "warnings": sum(f.severity == "warning" for f in findings),
        }
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {path}", file=sys.stderr)
    return 1 if any(f.severity == "problem" for f in findings) else 0
