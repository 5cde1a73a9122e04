"""Measure one data-loader run: the figures the demo and the benchmarks report.

Three layers, each usable on its own:

``measure(factory, epochs=...)``
    In this process: build a loader with ``factory()``, iterate it for
    ``epochs`` epochs (optionally with a simulated training step per batch),
    close it, and return a :class:`RunResult`. Works with any loader.
``run_spec(spec)``
    In this process: build the workload and the loader a :class:`RunSpec`
    describes (torch's ``DataLoader`` or ``nostall.DataLoader``) and measure it.
``run_isolated(spec)``
    The same in a fresh ``python -m nostall.cli._measure`` subprocess, in its own
    session, so runs do not share imports, caches, page-cache-warm allocators or
    memory figures; leftover processes of that session are killed and counted.

What is measured (all times from ``time.perf_counter``):

* time to first batch: from just before the loader is constructed to the
  arrival of the first batch of the first epoch;
* pause between epochs: for each boundary, from the end of the loop body of
  the last batch of epoch N to the arrival of the first batch of epoch N+1
  (with ``step_ms=0`` the loop body is empty, so it is arrival to arrival);
  it includes ``iter(loader)``, which is where torch starts non-persistent
  workers;
* time per batch: the mean interval between consecutive batch arrivals within
  an epoch (epoch span over batches; the first batch of each epoch excluded,
  it is the pause), the guide's "time per batch". ``median_batch_s`` keeps the
  median of the same intervals: with many workers batches arrive in bursts and
  the median can be near zero, so it is reported but not the headline;
* samples/s: samples delivered over the whole run, loader construction to
  the last batch, divided by that time;
* peak memory: the peak, over samples taken every ``sample_interval_s``
  (default 50 ms; longer when a sample is costly, to stay under ~2% of a core)
  by a background thread, of PSS summed over this process and
  all its descendants (``/proc/<pid>/smaps_rollup``). PSS splits shared pages
  between the processes sharing them, so forked workers are not counted
  several times. Where smaps_rollup cannot be read, RSS (which over-counts
  shared pages) is used and ``memory_metric`` says ``"rss"``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nostall._options import START_METHODS, int_from
from nostall.observe._cpus import usable_cpus
from nostall.observe._memory import ProcessTreeMemory
from nostall.observe._stats import batch_len

__all__ = [
    "LOADERS",
    "MeasureFailed",
    "ProcessTreeMemory",
    "RunResult",
    "RunSpec",
    "close_loader",
    "comparison_specs",
    "environment_info",
    "format_table",
    "measure",
    "median_of_runs",
    "nostall_available",
    "run_isolated",
    "run_spec",
]

LOADERS = ("torch", "nostall")
_MB = 1024.0 * 1024.0


# --------------------------------------------------------------------------- #
# Configuration
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class RunSpec:
    """One loader configuration on one workload. Validated on construction.

    ``start_method=None`` and ``persistent=None`` mean the loader's default;
    both are forced to ``None`` when ``num_workers == 0`` (torch rejects them
    there). ``step_ms`` is the simulated training step per batch.
    ``workload`` is a built-in workload's name or the user's ``module:factory``
    (``size`` and ``crop`` then do not apply); ``collate`` an optional
    ``module:fn``. ``batches_per_epoch`` ends each epoch early (``break``), for
    short probes of large datasets. ``worker_type`` applies to nostall only.
    """

    loader: str = "torch"
    workload: str = "spotgeo"
    size: int = 320
    batch_size: int = 32
    num_workers: int = 0
    start_method: str | None = None
    persistent: bool | None = None
    epochs: int = 3
    step_ms: float = 0.0
    shuffle: bool = True
    drop_last: bool = False
    prefetch_factor: int | None = None
    pin_memory: bool = False
    seed: int = 0
    cache_dir: str | None = None
    crop: int | None = 224
    sample_interval_s: float = 0.05
    collate: str | None = None
    batches_per_epoch: int | None = None
    worker_type: str | None = None

    def __post_init__(self) -> None:
        if self.loader not in LOADERS:
            raise ValueError(f"`loader` must be one of {LOADERS}; got {self.loader!r}.")
        from nostall.cli._resolve import is_reference
        from nostall.cli._workloads import WORKLOADS

        if self.workload not in WORKLOADS and not is_reference(self.workload):
            raise ValueError(
                f"`workload` must be one of {sorted(WORKLOADS)} or a `module:factory` reference; "
                f"got {self.workload!r}."
            )
        if self.collate is not None and not is_reference(self.collate):
            raise ValueError(f"`collate` must be None or a `module:function` reference; got {self.collate!r}.")
        if self.batches_per_epoch is not None and not int_from(1)(self.batches_per_epoch):
            raise ValueError(f"`batches_per_epoch` must be None or an int >= 1; got {self.batches_per_epoch!r}.")
        if self.worker_type not in (None, "process", "thread"):
            raise ValueError(f"`worker_type` must be None, 'process' or 'thread'; got {self.worker_type!r}.")
        for name in ("size", "batch_size", "epochs"):
            value = getattr(self, name)
            if not int_from(1)(value):
                raise ValueError(f"`{name}` must be a positive int; got {value!r}.")
        if not int_from(0)(self.num_workers):
            raise ValueError(f"`num_workers` must be an int >= 0; got {self.num_workers!r}.")
        if self.start_method is not None and self.start_method not in START_METHODS:
            raise ValueError(
                f"`start_method` must be None or one of {START_METHODS}; got {self.start_method!r}."
            )
        if self.step_ms < 0:
            raise ValueError(f"`step_ms` must be >= 0; got {self.step_ms!r}.")
        if self.sample_interval_s <= 0:
            raise ValueError(f"`sample_interval_s` must be > 0; got {self.sample_interval_s!r}.")
        if self.num_workers == 0:
            object.__setattr__(self, "start_method", None)
            if self.loader == "torch":
                object.__setattr__(self, "persistent", None)
            object.__setattr__(self, "prefetch_factor", None)

    @property
    def persistent_effective(self) -> bool | None:
        """Whether workers persist across epochs (None: there are no workers)."""
        if self.num_workers == 0:
            return None
        if self.persistent is not None:
            return self.persistent
        return self.loader == "nostall"  # the loaders' defaults

    def label(self) -> str:
        parts = [self.loader, f"workers={self.num_workers}"]
        if self.num_workers:
            parts.append(self.start_method or "default-start")
            parts.append("persistent" if self.persistent_effective else "transient")
            if self.worker_type == "thread" and self.loader == "nostall":
                parts.append("threads")
            if self.prefetch_factor is not None:
                parts.append(f"prefetch={self.prefetch_factor}")
        return " ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown RunSpec field(s): {sorted(unknown)}")
        return cls(**data)


@dataclass(frozen=True)
class RunResult:
    """The figures of one run. Times in seconds, memory in MiB (2**20 bytes).

    ``nan`` stands for "not measurable" (e.g. the time per batch of a run whose
    epochs hold a single batch); ``to_dict`` writes it as ``None``.
    """

    time_to_first_batch_s: float
    epoch_pauses_s: tuple[float, ...]
    median_batch_s: float
    mean_batch_s: float
    max_batch_s: float  # the longest interval between two batches of one epoch
    median_wait_s: float
    samples_per_s: float
    wall_s: float
    epoch_times_s: tuple[float, ...]
    total_samples: int
    total_batches: int
    epochs: int
    peak_memory_mb: float
    base_memory_mb: float
    memory_metric: str
    peak_processes: int
    orphans_killed: int = 0
    repeats: int = 1
    spec: RunSpec | None = None
    timeline_s: tuple = ()  # per epoch, each batch's arrival (s since construction)

    @property
    def max_pause_s(self) -> float:
        return max(self.epoch_pauses_s) if self.epoch_pauses_s else math.nan

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "spec":
                out[f.name] = value.to_dict() if value is not None else None
            elif f.name == "timeline_s":
                out[f.name] = [list(ep) for ep in value]
            elif isinstance(value, tuple):
                out[f.name] = [_nan_to_none(v) for v in value]
            else:
                out[f.name] = _nan_to_none(value)
        out["max_pause_s"] = _nan_to_none(self.max_pause_s)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunResult:
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in data:
                continue
            value = data[f.name]
            if f.name == "spec":
                kwargs[f.name] = RunSpec.from_dict(value) if value is not None else None
            elif f.name == "timeline_s":
                kwargs[f.name] = tuple(tuple(ep) for ep in value)
            elif isinstance(value, list):
                kwargs[f.name] = tuple(math.nan if v is None else v for v in value)
            elif value is None and f.name not in ("spec",):
                kwargs[f.name] = math.nan
            else:
                kwargs[f.name] = value
        return cls(**kwargs)


def median_of_runs(results: Sequence[RunResult]) -> RunResult:
    """Combine repeated runs of one spec: the median of every figure.

    Tuples (pauses, epoch times) are combined element by element; counts must
    agree; ``orphans_killed`` is summed; ``repeats`` counts the runs.
    """
    if not results:
        raise ValueError("`results` must hold at least one RunResult; got none.")
    if len(results) == 1:
        return results[0]
    out: dict[str, Any] = {}
    for f in dataclasses.fields(RunResult):
        values = [getattr(r, f.name) for r in results]
        if f.name in ("spec", "timeline_s"):
            out[f.name] = values[0]  # a timeline is one run's; the first stands for all
        elif f.name == "orphans_killed":
            out[f.name] = sum(values)
        elif f.name == "repeats":
            out[f.name] = sum(values)
        elif f.name == "memory_metric":
            out[f.name] = "pss" if all(v == "pss" for v in values) else "rss"
        elif isinstance(values[0], tuple):
            out[f.name] = tuple(_nan_median(col) for col in zip(*values))
        elif isinstance(values[0], float):
            out[f.name] = _nan_median(values)
        else:
            out[f.name] = int(statistics.median(values))
    return RunResult(**out)


def _nan_median(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return statistics.median(finite) if finite else math.nan


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


class MeasureFailed(RuntimeError):
    """A measured run failed (exit status, timeout, or unreadable output)."""

    def __init__(self, spec: RunSpec, reason: str, output_tail: str = "") -> None:
        self.spec = spec
        self.reason = reason
        self.output_tail = output_tail
        message = f"{spec.label()}: {reason}"
        if output_tail:
            message += "\n--- last output of the run ---\n" + output_tail
        super().__init__(message)


# --------------------------------------------------------------------------- #
# Measuring a loader in this process
# --------------------------------------------------------------------------- #


def _make_step(step_ms: float) -> Callable[[], None] | None:
    """A simulated training step: ``step_ms`` of small single-threaded matmuls.

    Torch ops release the GIL like a real training step does, so loader threads
    in this process are not starved the way a pure-Python spin would starve them.
    """
    if step_ms <= 0:
        return None
    import torch

    a = torch.randn(64, 64)
    b = torch.randn(64, 64)
    seconds = step_ms / 1000.0

    def step() -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            torch.mm(a, b)

    return step


def close_loader(loader: Any, iterator: Any = None) -> None:
    """Release the loader's workers: ``close()`` when it has one (nostall),
    else shut down torch's live iterators (persistent or unfinished)."""
    close = getattr(loader, "close", None)
    if callable(close):
        close()
        return
    for it in (iterator, getattr(loader, "_iterator", None)):
        shutdown = getattr(it, "_shutdown_workers", None)
        if callable(shutdown):
            shutdown()


def measure(
    factory: Callable[[], Iterable[Any]],
    *,
    epochs: int = 3,
    step_ms: float = 0.0,
    sample_interval_s: float = 0.05,
    progress: Callable[[str], None] | None = None,
    spec: RunSpec | None = None,
    batches_per_epoch: int | None = None,
) -> RunResult:
    """Build a loader with ``factory()``, run ``epochs`` epochs, close it, report.

    The loader is closed (``close_loader``) whatever happens. ``progress`` gets
    one line per epoch. ``batches_per_epoch`` leaves each epoch after that many
    batches (as a ``break`` in a training loop would).
    """
    if epochs < 1:
        raise ValueError(f"`epochs` must be >= 1; got {epochs!r}.")
    step = _make_step(step_ms)
    memory = ProcessTreeMemory(interval_s=sample_interval_s)
    memory.start()
    base_mb = memory.last_mb

    arrivals: list[list[float]] = []
    dones: list[list[float]] = []
    waits: list[float] = []
    total_samples = 0
    loader = None
    iterator = None
    perf = time.perf_counter
    t0 = perf()
    try:
        loader = factory()
        last_done = t0
        for epoch in range(epochs):
            epoch_arrivals: list[float] = []
            epoch_dones: list[float] = []
            arrivals.append(epoch_arrivals)
            dones.append(epoch_dones)
            iterator = iter(loader)
            for batch in iterator:
                now = perf()
                epoch_arrivals.append(now)
                waits.append(now - last_done)
                total_samples += batch_len(batch)
                del batch
                if step is not None:
                    step()
                last_done = perf()
                epoch_dones.append(last_done)
                if batches_per_epoch is not None and len(epoch_arrivals) >= batches_per_epoch:
                    break
            iterator = None
            if progress:
                progress(f"epoch {epoch + 1}/{epochs}: {len(epoch_arrivals)} batches")
        memory.sample()  # one certain sample while the workers live, however short the run
    finally:
        if loader is not None:
            close_loader(loader, iterator)
        iterator = None
        memory.stop()

    if not arrivals or not arrivals[0]:
        raise RuntimeError("the loader yielded no batch in the first epoch; nothing to measure.")
    t_end = arrivals[-1][-1] if arrivals[-1] else arrivals[0][-1]
    pauses = tuple(
        arrivals[e + 1][0] - dones[e][-1] for e in range(epochs - 1) if arrivals[e + 1] and dones[e]
    )
    intervals = [b - a for ep in arrivals for a, b in zip(ep, ep[1:])]
    in_epoch_waits = [w for w in _drop_epoch_firsts(waits, arrivals)]
    wall = t_end - t0
    return RunResult(
        time_to_first_batch_s=arrivals[0][0] - t0,
        epoch_pauses_s=pauses,
        median_batch_s=statistics.median(intervals) if intervals else math.nan,
        mean_batch_s=sum(intervals) / len(intervals) if intervals else math.nan,
        max_batch_s=max(intervals) if intervals else math.nan,
        median_wait_s=statistics.median(in_epoch_waits) if in_epoch_waits else math.nan,
        samples_per_s=total_samples / wall if wall > 0 else math.nan,
        wall_s=wall,
        epoch_times_s=tuple(
            (ep[-1] - (arrivals[i - 1][-1] if i else t0)) for i, ep in enumerate(arrivals) if ep
        ),
        total_samples=total_samples,
        total_batches=sum(len(ep) for ep in arrivals),
        epochs=epochs,
        peak_memory_mb=memory.peak_mb,
        base_memory_mb=base_mb,
        memory_metric=memory.metric,
        peak_processes=memory.peak_processes,
        spec=spec,
        timeline_s=tuple(tuple(round(t - t0, 6) for t in ep) for ep in arrivals),
    )


def _drop_epoch_firsts(waits: Sequence[float], arrivals: Sequence[Sequence[float]]) -> list[float]:
    out: list[float] = []
    i = 0
    for ep in arrivals:
        out.extend(waits[i + 1 : i + len(ep)])
        i += len(ep)
    return out


# --------------------------------------------------------------------------- #
# Running a RunSpec
# --------------------------------------------------------------------------- #


def nostall_available() -> bool:
    """True when ``nostall.DataLoader`` can be imported."""
    try:
        import nostall
    except Exception:
        return False
    return hasattr(nostall, "DataLoader")


def build_dataset(spec: RunSpec, progress: Callable[[str], None] | None = None) -> Any:
    """The dataset ``spec`` names: a built-in workload, or the user's ``module:factory``."""
    from nostall.cli._resolve import call_factory
    from nostall.cli._workloads import WORKLOADS

    if spec.workload not in WORKLOADS:
        return call_factory(spec.workload, "--dataset")
    options: dict[str, Any] = {"seed": spec.seed}
    if spec.workload == "spotgeo":
        options.update(root=spec.cache_dir, crop=spec.crop, progress=progress)
    return WORKLOADS[spec.workload].build(spec.size, **options)


def loader_factory(spec: RunSpec, dataset: Any) -> Callable[[], Any]:
    """A zero-argument function building the loader ``spec`` describes."""
    import torch

    if spec.loader == "nostall":
        import nostall

        cls = nostall.DataLoader
    else:
        cls = torch.utils.data.DataLoader
    kwargs: dict[str, Any] = dict(
        batch_size=spec.batch_size,
        shuffle=spec.shuffle,
        num_workers=spec.num_workers,
        pin_memory=spec.pin_memory,
        drop_last=spec.drop_last,
    )
    if spec.collate is not None:
        from nostall.cli._resolve import resolve

        kwargs["collate_fn"] = resolve(spec.collate, "--collate")
    if spec.worker_type is not None and spec.loader == "nostall":
        kwargs["worker_type"] = spec.worker_type
    if spec.num_workers > 0:
        if spec.start_method is not None:
            kwargs["multiprocessing_context"] = spec.start_method
        if spec.persistent is not None:
            kwargs["persistent_workers"] = spec.persistent
        if spec.prefetch_factor is not None:
            kwargs["prefetch_factor"] = spec.prefetch_factor

    def factory() -> Any:
        generator = torch.Generator()
        generator.manual_seed(spec.seed)
        return cls(dataset, generator=generator, **kwargs)

    return factory


def run_spec(spec: RunSpec, progress: Callable[[str], None] | None = None) -> RunResult:
    """Measure ``spec`` in this process (see :func:`run_isolated` for a fresh one)."""
    import torch

    torch.manual_seed(spec.seed)
    dataset = build_dataset(spec, progress)
    return measure(
        loader_factory(spec, dataset),
        epochs=spec.epochs,
        step_ms=spec.step_ms,
        sample_interval_s=spec.sample_interval_s,
        progress=progress,
        spec=spec,
        batches_per_epoch=spec.batches_per_epoch,
    )


def _session_leftovers(sid: int) -> list[int]:
    """Pids still alive in session ``sid`` (the measured run's processes)."""
    import psutil

    left = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid:
                left.append(proc.pid)
        except (OSError, psutil.Error):
            pass
    return left


def _kill_session(sid: int, grace_s: float = 0.0) -> int:
    """Kill what is left of session ``sid`` after ``grace_s`` seconds; return the count.

    The grace lets helpers that end by themselves when their parent exits (the
    forkserver, the resource tracker) do so; only what is still there after
    it counts as an orphan.
    """
    deadline = time.monotonic() + grace_s
    left = _session_leftovers(sid)
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = _session_leftovers(sid)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return len(left)


def run_isolated(
    spec: RunSpec,
    *,
    timeout: float | None = 900.0,
    env: dict[str, str] | None = None,
    stderr: Any = None,
    orphan_grace_s: float = 3.0,
) -> RunResult:
    """Measure ``spec`` in a fresh ``python -m nostall.cli._measure`` subprocess.

    The child runs in a session of its own; when it ends (or on timeout or
    Ctrl-C) every process left in that session is killed, and the count is
    reported as ``orphans_killed`` (a loader that leaves none shows 0; helpers
    get ``orphan_grace_s`` to exit by themselves first).
    ``stderr``: where the child's progress goes (default: captured and shown
    only on failure). Raises :class:`MeasureFailed` when the run fails.
    """
    src_dir = str(Path(__file__).resolve().parents[2])
    child_env = dict(os.environ if env is None else env)
    child_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (src_dir, child_env.get("PYTHONPATH", "")) if p
    )
    cmd = [sys.executable, "-m", "nostall.cli._measure", "--spec", json.dumps(spec.to_dict()), "--json"]
    if stderr is not None:
        cmd.append("--verbose")
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE if stderr is None else stderr,
        stdin=subprocess.DEVNULL,
        env=child_env,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_session(proc.pid)
        out, err = proc.communicate()
        raise MeasureFailed(spec, f"timed out after {timeout:.0f} s", _tail(out, err)) from None
    except BaseException:
        _kill_session(proc.pid)
        proc.wait()
        raise
    orphans = _kill_session(proc.pid, grace_s=orphan_grace_s)
    if proc.returncode != 0:
        raise MeasureFailed(spec, f"exited with status {proc.returncode}", _tail(out, err))
    for line in reversed(out.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                result = RunResult.from_dict(json.loads(line))
            except (ValueError, TypeError) as exc:
                raise MeasureFailed(spec, f"unreadable result ({exc})", _tail(out, err)) from None
            return dataclasses.replace(result, orphans_killed=orphans, spec=spec)
    raise MeasureFailed(spec, "printed no result", _tail(out, err))


def _tail(out: str | None, err: str | None, lines: int = 30) -> str:
    text = "\n".join(s for s in ((out or "").rstrip(), (err or "").rstrip()) if s)
    return "\n".join(text.splitlines()[-lines:])


# --------------------------------------------------------------------------- #
# Configuration matrices and the comparison table (demo and benchmarks)
# --------------------------------------------------------------------------- #


def comparison_specs(
    *,
    workers: Sequence[int],
    start_methods: Sequence[str],
    loaders: Sequence[str] = LOADERS,
    torch_persistent: Sequence[bool] = (False, True),
    nostall_persistent: bool | None = None,
    **common: Any,
) -> list[RunSpec]:
    """The side-by-side matrix, grouped so rows to compare sit together.

    For ``num_workers == 0``: one row per loader (no start method, nothing to
    persist). For each ``num_workers > 0`` and start method: torch once per
    ``torch_persistent`` value (by default transient, its default, then
    ``persistent_workers=True``), then nostall with ``nostall_persistent``
    (None: its default, persistent). ``common`` goes to every :class:`RunSpec`.
    """
    specs: list[RunSpec] = []
    for nw in workers:
        if nw == 0:
            for loader in loaders:
                specs.append(RunSpec(loader=loader, num_workers=0, **common))
            continue
        for method in start_methods:
            for loader in loaders:
                if loader == "torch":
                    for persistent in torch_persistent:
                        specs.append(RunSpec(loader="torch", num_workers=nw, start_method=method,
                                             persistent=persistent, **common))
                else:
                    specs.append(RunSpec(loader=loader, num_workers=nw, start_method=method,
                                         persistent=nostall_persistent, **common))
    return specs


TABLE_HEADER = (
    "loader", "num_workers", "start method", "persistent", "time to first batch (s)",
    "pause between epochs (s)", "time per batch (s)", "samples/s", "peak {metric} (MB)",
)


def _fmt(value: float, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.{digits}f}"


def format_pauses(pauses: Sequence[float], max_listed: int = 3) -> str:
    """"0.012, 0.015" for a few pauses, "max 0.015" for many, "-" for none."""
    if not pauses:
        return "-"
    if len(pauses) <= max_listed:
        return ", ".join(_fmt(p) for p in pauses)
    return f"max {_fmt(max(pauses))}"


def table_row(item: RunResult | MeasureFailed) -> list[str]:
    spec = item.spec
    assert spec is not None  # results made by run_spec / run_isolated carry their spec
    persistent = spec.persistent_effective
    head = [
        spec.loader,
        str(spec.num_workers),
        spec.start_method or ("-" if spec.num_workers == 0 else "default"),
        "-" if persistent is None else ("yes" if persistent else "no"),
    ]
    if isinstance(item, MeasureFailed):
        return head + [f"failed: {item.reason}", "", "", "", ""]
    return head + [
        _fmt(item.time_to_first_batch_s),
        format_pauses(item.epoch_pauses_s),
        _fmt(item.mean_batch_s, 4),
        _fmt(item.samples_per_s, 1),
        _fmt(item.peak_memory_mb, 0),
    ]


def format_table(items: Sequence[RunResult | MeasureFailed], verdicts: Sequence[str] | None = None) -> str:
    """A markdown table, one row per run, columns as in :data:`TABLE_HEADER`
    (and a last ``verdict`` column when ``verdicts`` are given)."""
    metrics = {i.memory_metric for i in items if isinstance(i, RunResult)}
    metric = "PSS" if metrics <= {"pss"} else "RSS"
    header = [h.format(metric=metric) for h in TABLE_HEADER]
    rows = [table_row(i) for i in items]
    if verdicts is not None:
        header.append("verdict")
        rows = [row + [v] for row, v in zip(rows, verdicts)]
    widths = [max(len(header[c]), *(len(r[c]) for r in rows)) if rows else len(header[c])
              for c in range(len(header))]
    numeric = set(range(1, len(TABLE_HEADER))) - {2, 3}

    def line(cells: Sequence[str]) -> str:
        out = []
        for c, cell in enumerate(cells):
            out.append(cell.rjust(widths[c]) if c in numeric else cell.ljust(widths[c]))
        return "| " + " | ".join(out) + " |"

    sep = "|" + "|".join(
        ("-" * (widths[c] + 1) + ":") if c in numeric else ("-" * (widths[c] + 2))
        for c in range(len(header))
    ) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def summary_line(result: RunResult) -> str:
    """One progress line: the headline figures of a finished run."""
    return (
        f"first batch {_fmt(result.time_to_first_batch_s)} s, "
        f"pauses {format_pauses(result.epoch_pauses_s)} s, "
        f"{_fmt(result.mean_batch_s, 4)} s/batch (median interval {_fmt(result.median_batch_s, 4)}), "
        f"{_fmt(result.samples_per_s, 1)} samples/s, "
        f"peak {result.memory_metric.upper()} {_fmt(result.peak_memory_mb, 0)} MB"
        + (f", {result.orphans_killed} orphan process(es) killed" if result.orphans_killed else "")
    )


def environment_info() -> dict[str, Any]:
    """Where a measurement ran: enough to tell two machines apart."""
    import platform

    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable_cpus().count,
        "nostall_available": nostall_available(),
    }


# --------------------------------------------------------------------------- #
# python -m nostall.cli._measure
# --------------------------------------------------------------------------- #


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m nostall.cli._measure",
        description="Measure one loader configuration in this process.",
    )
    p.add_argument("--spec", help="a RunSpec as JSON (other options override its fields)")
    p.add_argument("--loader", choices=LOADERS)
    p.add_argument("--workload")
    p.add_argument("--size", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--workers", type=int, dest="num_workers")
    p.add_argument("--start-method", choices=START_METHODS)
    p.add_argument("--persistent", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--epochs", type=int)
    p.add_argument("--step-ms", type=float)
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    p.add_argument("--verbose", action="store_true", help="progress on stderr")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    fields = json.loads(args.spec) if args.spec else {}
    for name in ("loader", "workload", "size", "batch_size", "num_workers", "start_method",
                 "persistent", "epochs", "step_ms"):
        value = getattr(args, name)
        if value is not None:
            fields[name] = value
    spec = RunSpec.from_dict(fields)

    def progress(msg: str) -> None:
        print(f"[{spec.label()}] {msg}", file=sys.stderr, flush=True)

    result = run_spec(spec, progress=progress if args.verbose or not args.json else None)
    if args.json:
        print(json.dumps(result.to_dict()), flush=True)
    else:
        for key, value in result.to_dict().items():
            if key != "spec":
                print(f"{key:>24}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
