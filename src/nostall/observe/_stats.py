"""Where a training loop's time goes: live statistics, a log line, a timeline.

The loop's time is split at every call to ``next()``: time *inside* it is time
the loop waited for data, time *between* a batch's return and the next call is
the loop's own work (the training step). ``iter()`` counts as waiting too: it is
where torch starts transient workers. Per epoch: batches, samples, waiting and
working time, the waiting fraction, and how long the epoch took to deliver its
first batch (the time to first batch for epoch 0, the pause between epochs
after that). Loaders that know their workers (``nostall.DataLoader``) add each
worker's busy fraction and the batches in flight; a background thread samples
the peak memory of the whole process tree (PSS) at most once a second and
within 0.5% of a core.

Cost on the loop: two clock reads, a few additions and one append to a bounded
timeline per batch (about a microsecond; see BENCHMARKS.md).

Memory is bounded however long the run: the trace keeps the last
``_TIMELINE_LIMIT`` batches in compact rings of doubles (24 bytes per batch for the
loop, 40 for the workers' spans: ~3.5 MB when full, against ~30 MB for the same
batches as tuples), and the last ``_EPOCHS_KEPT`` epochs are listed (the totals and
the time to first batch cover every epoch). Without statistics (``stats=False``)
nothing is kept per batch or per epoch.
"""

from __future__ import annotations

import json
import logging
import time
from array import array
from collections import deque
from itertools import chain
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from ._memory import ProcessTreeMemory

_TIMELINE_LIMIT = 50_000  # batches kept for the trace (the latest): ~3.5 MB at most (see _Ring)
_EPOCHS_KEPT = 1_000  # epochs listed in loader.stats.epochs (the latest)
_clock = time.monotonic  # the clock worker processes stamp their batches with
_MEMORY_FIRST_S = 1.0  # when the memory sampler takes its first sample (closing takes one too)

log = logging.getLogger("nostall")


def batch_len(batch: Any) -> int:
    """Number of samples in a collated batch (dict, tuple/list or tensor)."""
    if isinstance(batch, dict):
        batch = next(iter(batch.values()), None)
    elif isinstance(batch, (list, tuple)) and batch:
        batch = batch[0]
    if getattr(batch, "is_nested", False):  # a nested tensor has no single shape
        return int(batch.size(0))
    shape = getattr(batch, "shape", None)
    if shape is not None and len(shape) > 0:
        return int(shape[0])
    try:
        return len(batch)
    except TypeError:
        return 1


class _Ring:
    """The latest ``capacity`` records (tuples of ``width`` numbers), packed into arrays
    of doubles ``CHUNK`` records at a time: 8 bytes a number, where a tuple of floats
    takes about 30 (the 100,000 tuples the trace used to keep took ~30 MB). Writers
    append tuples to ``pending`` (as cheap as a list append: this is the loop's hot
    path) and call :meth:`pack` when it holds ``CHUNK``. Packed chunks are dropped
    whole, oldest first: it holds ``capacity`` to ``capacity + 2 CHUNK`` records once
    full. Iterating gives the records as tuples of floats, oldest first."""

    CHUNK = 1024

    __slots__ = ("pending", "_chunks", "_width")

    def __init__(self, width: int, capacity: int) -> None:
        self._width = width
        self._chunks: deque = deque(maxlen=max(1, -(-capacity // self.CHUNK)))
        self.pending: list = []

    def append(self, record: tuple) -> None:
        """Add one record (hot paths inline this: append to ``pending``, then pack)."""
        self.pending.append(record)
        if len(self.pending) >= self.CHUNK:
            self.pack()

    def pack(self) -> None:
        """Move the pending records into a packed chunk."""
        self._chunks.append(array("d", chain.from_iterable(self.pending)))
        self.pending = []

    def __len__(self) -> int:
        return sum(len(c) for c in self._chunks) // self._width + len(self.pending)

    def __bool__(self) -> bool:
        return bool(self.pending or self._chunks)

    def __iter__(self):
        w = self._width
        for chunk in list(self._chunks):
            for i in range(0, len(chunk), w):
                yield tuple(chunk[i:i + w])
        yield from list(self.pending)

    def __getitem__(self, i: int) -> tuple:
        """Only the first record (``ring[0]``) and the last (``ring[-1]``) are needed."""
        if i == -1 and (self.pending or self._chunks):
            return self.pending[-1] if self.pending else tuple(self._chunks[-1][-self._width:])
        if i == 0 and (self.pending or self._chunks):
            return tuple(self._chunks[0][:self._width]) if self._chunks else self.pending[0]
        raise IndexError(i)


@dataclass(frozen=True)
class EpochStats:
    """One epoch as the training loop saw it. Times in seconds.

    ``start_s`` is the time from ``iter()`` to the first batch (for epoch 0 from
    the loader's construction: the time to first batch); for later epochs it is
    the pause between epochs. ``complete`` is False for an epoch in progress or
    abandoned (``break``).
    """

    number: int
    batches: int
    samples: int
    wait_s: float
    step_s: float
    start_s: float | None
    complete: bool

    @property
    def waiting_fraction(self) -> float:
        """Share of the loop's time spent waiting for data (0 to 1)."""
        total = self.wait_s + self.step_s
        return self.wait_s / total if total > 0 else 0.0

    @property
    def samples_per_s(self) -> float:
        """Samples delivered per second of the loop's time in this epoch."""
        total = self.wait_s + self.step_s
        return self.samples / total if total > 0 else 0.0


class WorkerLog:
    """What the workers did, fed by the loader's engine: busy time per worker,
    batches in flight at each delivery, and each batch's span for the trace."""

    def __init__(self, num_workers: int, window: int, supervisor=None, spans: bool = True) -> None:
        self.started = _clock()
        self.supervisor = supervisor  # restarts and skipped samples (``_supervise.Supervisor``)
        self.tuner = None  # num_workers="auto" (``_autotune.AutoTuner``)
        self.window = window
        self.busy_s = [0.0] * num_workers
        self.started_workers = num_workers  # num_workers="auto" starts fewer, and more later
        self.batches = [0] * num_workers
        self.in_flight_sum = 0
        self.in_flight_max = 0
        self.deliveries = 0
        # (worker, epoch, batch_no, started, done) for the trace; kept only with statistics on
        self.spans: _Ring | None = _Ring(5, _TIMELINE_LIMIT) if spans else None

    def made(self, worker_id: int, epoch: int, batch_no: int, started: float, done: float) -> None:
        """A worker finished a batch (its own time stamps)."""
        self.busy_s[worker_id] += done - started
        self.batches[worker_id] += 1
        spans = self.spans
        if spans is not None:
            spans.pending.append((worker_id, epoch, batch_no, started, done))
            if len(spans.pending) >= _Ring.CHUNK:
                spans.pack()

    def delivered(self, in_flight: int) -> None:
        """A batch was handed to the loop while ``in_flight`` batches were in the window."""
        self.in_flight_sum += in_flight
        self.deliveries += 1
        if in_flight > self.in_flight_max:
            self.in_flight_max = in_flight


class Recorder:
    """Accumulates the loop's timings. ``begin``/``batch``/``end`` are called by
    the iterator that wraps ``next()``; everything else reads."""

    def __init__(self) -> None:
        self.created = _clock()
        self.epochs: deque[EpochStats] = deque(maxlen=_EPOCHS_KEPT)  # the latest finished epochs
        self.epoch_count = 0  # every epoch begun (``epochs`` keeps the latest)
        self.first_batch_s: float | None = None  # epoch 0's time to first batch (kept when it leaves ``epochs``)
        self.timeline = _Ring(3, _TIMELINE_LIMIT)  # (epoch, called, returned), the latest batches
        self.marks: deque = deque(maxlen=_EPOCHS_KEPT)  # [epoch, iter called, first batch or None, end or None]
        self.memory: ProcessTreeMemory | None = None
        self.workers: Callable[[], WorkerLog | None] = lambda: None
        self.log_every = 0
        self.logger: logging.Logger = log
        self._open = False
        self._reset_epoch(-1, 0.0)
        self._totals = [0, 0, 0.0, 0.0]  # batches, samples, wait, step (finished epochs)
        self._log_from = (0, 0.0, 0.0, 0)  # batches, wait, step, samples at the last log line
        self.device: list | None = None  # [batches, copy s, wait s] of a to_device hand-off

    def device_copied(self, copy_s: float, wait_s: float) -> None:
        """One batch handed to the device by ``nostall.to_device``: the training thread
        spent ``copy_s`` starting its copy and ``wait_s`` waiting for it to finish."""
        if self.device is None:
            self.device = [0, 0.0, 0.0]
        self.device[0] += 1
        self.device[1] += copy_s
        self.device[2] += wait_s

    def _reset_epoch(self, number: int, iter_called: float) -> None:
        self._number = number
        self._iter_called = iter_called
        self._batches = 0
        self._samples = 0
        self._wait = 0.0
        self._step = 0.0
        self._start: float | None = None
        self._last_return: float | None = None

    # -- fed by the iterator ---------------------------------------------------
    def begin(self, iter_called: float, iter_returned: float) -> None:
        """A new epoch's ``iter()`` ran from ``iter_called`` to ``iter_returned``."""
        if self._open:
            self._close_epoch(complete=False, end=None)
        if self.memory is None:
            self._start_memory()
        self._reset_epoch(self.epoch_count, iter_called)
        self.epoch_count += 1
        self._wait = iter_returned - iter_called
        self._open = True
        self.marks.append([self._number, iter_called, None, None])

    def batch(self, called: float, returned: float, batch: Any) -> None:
        """``next()`` ran from ``called`` to ``returned`` and gave ``batch``."""
        if self._last_return is not None:
            self._step += called - self._last_return
        else:
            origin = self.created if self._number == 0 else self._iter_called
            self._start = returned - origin
            if self._number == 0:
                self.first_batch_s = self._start
            self.marks[-1][2] = returned
        self._wait += returned - called
        self._last_return = returned
        self._batches += 1
        self._samples += batch_len(batch)
        pending = self.timeline.pending
        pending.append((self._number, called, returned))
        if len(pending) >= _Ring.CHUNK:
            self.timeline.pack()
        if self.log_every and self._batches % self.log_every == 0:
            self._log_line()

    def end(self, called: float, returned: float) -> None:
        """``next()`` ran from ``called`` to ``returned`` and raised StopIteration."""
        if not self._open:
            return
        if self._last_return is not None:
            self._step += called - self._last_return
        self._wait += returned - called
        self._close_epoch(complete=True, end=returned)

    def _close_epoch(self, complete: bool, end: float | None) -> None:
        self._open = False
        self.marks[-1][3] = end if end is not None else self._last_return
        stats = self._snapshot(complete)
        self.epochs.append(stats)
        totals = self._totals
        totals[0] += stats.batches
        totals[1] += stats.samples
        totals[2] += stats.wait_s
        totals[3] += stats.step_s
        self._log_from = (totals[0], totals[2], totals[3], totals[1])

    def _snapshot(self, complete: bool) -> EpochStats:
        return EpochStats(self._number, self._batches, self._samples, self._wait, self._step,
                          self._start, complete)

    def _start_memory(self) -> None:
        try:  # the first sample after a second: the loader is starting its workers now
            self.memory = ProcessTreeMemory(interval_s=1.0, budget=0.005).start(delay_s=_MEMORY_FIRST_S)
        except Exception:  # no psutil or no /proc: memory is simply not reported
            self.memory = None

    def _log_line(self) -> None:
        batches, wait, step, samples = self._totals_now()
        b0, w0, s0, n0 = self._log_from
        self._log_from = (batches, wait, step, samples)
        dw, ds = wait - w0, step - s0
        total = dw + ds
        if total <= 0:
            return
        self.logger.info(
            "epoch %d, batches %d-%d: waited %.3f s for data (%.0f%%), trained %.3f s (%.0f%%), %.0f samples/s",
            self._number, self._batches - (batches - b0) + 1, self._batches,
            dw, 100 * dw / total, ds, 100 * ds / total, (samples - n0) / total,
        )

    def _totals_now(self) -> tuple:
        t = self._totals
        if not self._open:
            return t[0], t[2], t[3], t[1]
        return t[0] + self._batches, t[2] + self._wait, t[3] + self._step, t[1] + self._samples

    # -- read by LoaderStats ---------------------------------------------------
    def all_epochs(self) -> list[EpochStats]:
        """The latest finished epochs (at most ``_EPOCHS_KEPT``), then the one in progress (if any)."""
        return [*self.epochs] + ([self._snapshot(False)] if self._open else [])

    def current_waiting_fraction(self) -> float:
        """Waiting fraction of the epoch in progress (of the last one between epochs)."""
        if self._open:
            return self._snapshot(False).waiting_fraction
        return self.epochs[-1].waiting_fraction if self.epochs else 0.0

    def close(self) -> None:
        """Stop memory sampling (the figures stay readable)."""
        if self.memory is not None:
            self.memory.stop()


class MeasuredIterator:
    """An epoch's iterator that times each ``next()`` into a :class:`Recorder`."""

    __slots__ = ("_next", "_rec", "_len_fn", "_engine", "__weakref__")

    def __init__(self, next_fn: Callable[[], Any], recorder: Recorder, len_fn: Callable[[], int],
                 engine: Any = None) -> None:
        self._next = next_fn
        self._rec = recorder
        self._len_fn = len_fn
        self._engine = engine

    @property
    def _workers(self) -> list:
        """torch's private ``_workers``, for code that reads it (see ``_compat``)."""
        from ..core._compat import worker_processes

        return worker_processes(self._engine)

    def __iter__(self) -> MeasuredIterator:
        return self

    def __next__(self) -> Any:
        called = _clock()
        try:
            batch = self._next()
        except StopIteration:
            self._rec.end(called, _clock())
            raise
        self._rec.batch(called, _clock(), batch)
        return batch

    def __len__(self) -> int:
        return self._len_fn()


SCALAR_NAMES = {  # what LoaderStats.scalars() gives, after its prefix ("nostall/")
    "wait_fraction": "share of the loop's time spent waiting for data (0 to 1)",
    "batches_per_s": "batches delivered per second of the loop's time",
    "samples_per_s": "samples delivered per second of the loop's time",
    "workers_busy": "mean busy fraction of the workers (0 to 1)",
    "in_flight": "mean batches in flight when a batch was delivered",
    "restarts": "workers replaced so far (crashed, killed, hung)",
    "skipped": "samples skipped so far (on_sample_error='skip')",
    "num_workers": "workers in use now",
    "device_copy_ms": "mean time per batch the loop spent starting copies to the device (to_device)",
    "device_wait_ms": "mean time per batch the loop waited for a copy to the device (to_device)",
}


class LoaderStats:
    """Statistics of one loader or ``nostall.watch`` wrapper, live: every read
    reflects the batches delivered so far. ``print(stats)`` gives a summary."""

    def __init__(self, recorder: Recorder, num_workers: int | None = None) -> None:
        self._rec = recorder
        self.num_workers = num_workers
        self._window: tuple | None = None  # the totals at the last scalars() call

    # -- the loop --------------------------------------------------------------
    @property
    def epochs(self) -> list[EpochStats]:
        """Every epoch so far, the latest 1,000 of a longer run (each has its ``number``);
        the last one may be in progress (``complete=False``)."""
        return self._rec.all_epochs()

    @property
    def batches(self) -> int:
        """Batches delivered to the loop."""
        return self._rec._totals_now()[0]

    @property
    def samples(self) -> int:
        """Samples delivered to the loop."""
        return self._rec._totals_now()[3]

    @property
    def wait_s(self) -> float:
        """Seconds the loop spent waiting for data (inside ``iter()``/``next()``)."""
        return self._rec._totals_now()[1]

    @property
    def step_s(self) -> float:
        """Seconds the loop spent on its own work between batches."""
        return self._rec._totals_now()[2]

    @property
    def waiting_fraction(self) -> float:
        """Share of the loop's time spent waiting for data, over all epochs (0 to 1)."""
        wait, step = self.wait_s, self.step_s
        return wait / (wait + step) if wait + step > 0 else 0.0

    @property
    def time_to_first_batch_s(self) -> float | None:
        """From the loader's construction to its first batch."""
        return self._rec.first_batch_s

    @property
    def pauses_s(self) -> list[float]:
        """Each pause between epochs: from ``iter()`` to the epoch's first batch (of the
        epochs listed in ``epochs``)."""
        return [e.start_s for e in self.epochs if e.number > 0 and e.start_s is not None]

    @property
    def samples_per_s(self) -> float:
        """Samples per second of the loop's time (waiting plus working)."""
        total = self.wait_s + self.step_s
        return self.samples / total if total > 0 else 0.0

    # -- the workers (nostall.DataLoader only) -----------------------------------
    @property
    def worker_busy(self) -> list[float] | None:
        """Each worker's busy fraction since the pool started (None: unknown)."""
        workers = self._rec.workers()
        if workers is None or not workers.busy_s:
            return None
        elapsed = max(_clock() - workers.started, 1e-9)
        return [min(1.0, busy / elapsed) for busy in workers.busy_s[:workers.started_workers]]

    @property
    def in_flight(self) -> dict | None:
        """Batches in the window when a batch was delivered: mean, max, and the window."""
        workers = self._rec.workers()
        if workers is None or not workers.deliveries:
            return None
        return {"mean": workers.in_flight_sum / workers.deliveries, "max": workers.in_flight_max,
                "window": workers.window}

    @property
    def tuner(self) -> list[dict]:
        """num_workers="auto": each change (seconds since start, workers, prefetch, reason)."""
        workers = self._rec.workers()
        if workers is None or workers.tuner is None:
            return []
        return [dict(vars(d)) for d in workers.tuner.decisions]

    @property
    def restarts(self) -> list[str]:
        """What happened to each worker nostall replaced (crashed, killed, hung); the
        latest 1,000 (``str(stats)`` gives the total)."""
        workers = self._rec.workers()
        return list(workers.supervisor.restarts) if workers is not None and workers.supervisor else []

    @property
    def skipped(self) -> list[dict]:
        """Samples left out under ``on_sample_error="skip"``: epoch, batch, index, error
        (the latest 10,000; ``str(stats)`` gives the total)."""
        workers = self._rec.workers()
        if workers is None or workers.supervisor is None:
            return []
        return [dict(epoch=e, batch=b, index=i, error=err) for e, b, i, err in workers.supervisor.skipped]

    @property
    def device(self) -> dict | None:
        """The hand-off to the device (``nostall.to_device``): batches copied,
        ``copy_s`` the training thread spent starting copies (and pinning unpinned
        batches), ``wait_s`` it waited for copies to finish; None without a hand-off."""
        device = self._rec.device
        if device is None:
            return None
        return {"batches": device[0], "copy_s": device[1], "wait_s": device[2]}

    # -- memory ----------------------------------------------------------------
    @property
    def peak_memory_mb(self) -> float | None:
        """Peak memory of this process and all its children, MiB (PSS where readable)."""
        memory = self._rec.memory
        if memory is None:
            return None
        if memory.samples == 0 and not memory.stopped:  # read before the sampler's first sample
            memory.sample()
        return memory.peak_mb

    @property
    def memory_metric(self) -> str | None:
        """``"pss"`` or ``"rss"`` (where PSS cannot be read)."""
        memory = self._rec.memory
        return memory.metric if memory is not None else None

    # -- output ------------------------------------------------------------------
    def log_every(self, batches: int, logger: logging.Logger | None = None) -> None:
        """Log the guide's "load vs train" line every ``batches`` batches (0: never),
        at INFO level on ``logger`` (default: the ``nostall`` logger)."""
        if isinstance(batches, bool) or not isinstance(batches, int) or batches < 0:
            raise ValueError(f"`batches` must be an int >= 0; got {batches!r}.")
        self._rec.log_every = batches
        if logger is not None:
            self._rec.logger = logger

    def to_dict(self) -> dict:
        """Every figure as plain data (JSON-ready)."""
        return {
            "batches": self.batches,
            "samples": self.samples,
            "wait_s": self.wait_s,
            "step_s": self.step_s,
            "waiting_fraction": self.waiting_fraction,
            "time_to_first_batch_s": self.time_to_first_batch_s,
            "pauses_s": self.pauses_s,
            "samples_per_s": self.samples_per_s,
            "num_workers": self.num_workers,
            "worker_busy": self.worker_busy,
            "in_flight": self.in_flight,
            "tuner": self.tuner,
            "restarts": self.restarts,
            "skipped": self.skipped,
            "peak_memory_mb": self.peak_memory_mb,
            "memory_metric": self.memory_metric,
            "device": self.device,
            "epochs": [dict(asdict(e), waiting_fraction=e.waiting_fraction, samples_per_s=e.samples_per_s)
                       for e in self.epochs],
        }

    def scalars(self, prefix: str = "nostall/") -> dict[str, float]:
        """The figures since the previous call (the first call: since the start) as a flat
        ``{name: float}`` for ``SummaryWriter.add_scalars``, ``wandb.log`` or Lightning's
        ``self.log_dict``. Names (after ``prefix``), see SCALAR_NAMES:
        ``wait_fraction``, ``batches_per_s``, ``samples_per_s``, then with workers
        (nostall.DataLoader) ``workers_busy`` (mean busy fraction), ``in_flight`` (mean
        batches in the window at delivery), ``restarts`` and ``skipped`` (totals) and
        ``num_workers``; with ``nostall.to_device``, ``device_copy_ms`` and
        ``device_wait_ms`` (per batch). Figures not known (no batch in the window) are
        left out."""
        batches, wait, step, samples = self._rec._totals_now()
        now = _clock()
        workers = self._rec.workers()
        busy = sum(workers.busy_s) if workers is not None else 0.0
        flight = (workers.in_flight_sum, workers.deliveries) if workers is not None else (0, 0)
        device = tuple(self._rec.device or (0, 0.0, 0.0))
        b0, w0, s0, n0, t0, busy0, f0, d0 = self._window or (
            0, 0.0, 0.0, 0, workers.started if workers is not None else now, 0.0, (0, 0), (0, 0.0, 0.0))
        self._window = (batches, wait, step, samples, now, busy, flight, device)
        out: dict[str, float] = {}
        loop_s = (wait - w0) + (step - s0)
        if loop_s > 0:
            out["wait_fraction"] = (wait - w0) / loop_s
            out["batches_per_s"] = (batches - b0) / loop_s
            out["samples_per_s"] = (samples - n0) / loop_s
        if workers is not None:
            count = workers.started_workers
            if now > t0 and count:
                out["workers_busy"] = min(1.0, (busy - busy0) / ((now - t0) * count))
            if flight[1] > f0[1]:
                out["in_flight"] = (flight[0] - f0[0]) / (flight[1] - f0[1])
            sup = workers.supervisor
            out["restarts"] = float(sup.restart_count if sup is not None else 0)
            out["skipped"] = float(sup.skipped_total if sup is not None else 0)
            out["num_workers"] = float(workers.tuner.workers if workers.tuner is not None else count)
        if device[0] > d0[0]:
            out["device_copy_ms"] = 1000 * (device[1] - d0[1]) / (device[0] - d0[0])
            out["device_wait_ms"] = 1000 * (device[2] - d0[2]) / (device[0] - d0[0])
        return {prefix + name: float(value) for name, value in out.items()}

    def __str__(self) -> str:
        lines = []
        for e in self.epochs:
            start = "-" if e.start_s is None else f"{e.start_s:.3f} s"
            what = "first batch" if e.number == 0 else "pause"
            lines.append(
                f"epoch {e.number}: {e.batches} batches, waited {e.wait_s:.3f} s for data "
                f"({e.waiting_fraction:.0%}), trained {e.step_s:.3f} s, {what} {start}, "
                f"{e.samples_per_s:.0f} samples/s" + ("" if e.complete else " (in progress or abandoned)")
            )
        total = (f"overall: {self.batches} batches, {self.samples} samples, waited for data "
                 f"{self.waiting_fraction:.0%} of the time, {self.samples_per_s:.0f} samples/s")
        if self.pauses_s:
            total += f", longest pause between epochs {max(self.pauses_s):.3f} s"
        lines.append(total)
        busy = self.worker_busy
        if busy is not None:
            lines.append("workers busy: " + ", ".join(f"{b:.0%}" for b in busy))
        flight = self.in_flight
        if flight is not None:
            lines.append(f"batches in flight: mean {flight['mean']:.1f}, max {flight['max']} "
                         f"(window {flight['window']})")
        if self.tuner:
            last = self.tuner[-1]
            lines.append(f"auto: {last['workers']} workers, prefetch {last['prefetch']} after "
                         f"{len(self.tuner)} change(s); last: {last['reason']}")
        if self.restarts:
            lines.append(f"worker restarts: {self._rec.workers().supervisor.restart_count}; "
                         f"last: {self.restarts[-1]}")
        if self.skipped:
            workers = self._rec.workers()
            lines.append(f"samples skipped: {workers.supervisor.skipped_total}; first kept: index "
                         f"{self.skipped[0]['index']} ({self.skipped[0]['error']})")
        if self.device is not None and self.device["batches"]:
            d = self.device
            lines.append(f"copies to the device: {d['batches']} batches, the loop spent "
                         f"{1000 * d['copy_s'] / d['batches']:.2f} ms/batch starting them and "
                         f"{1000 * d['wait_s'] / d['batches']:.2f} ms/batch waiting for them")
        if self.peak_memory_mb is not None:
            lines.append(f"peak memory ({self.memory_metric.upper()}, process tree): {self.peak_memory_mb:.0f} MB")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"<LoaderStats {self.batches} batches, waiting {self.waiting_fraction:.0%}, "
                f"{self.samples_per_s:.0f} samples/s>")

    def export_trace(self, path: str | Path, profiler_trace: str | Path | None = None) -> Path:
        """Write the timeline as Chrome trace-event JSON (open it in Perfetto or
        chrome://tracing): the loop's waits and steps, each epoch, and each
        worker's batches (nostall.DataLoader). Returns the path.

        ``profiler_trace``: a torch.profiler trace (``prof.export_chrome_trace(...)``);
        its events and nostall's are written together to ``path`` on the profiler's
        clock (wall-clock microseconds less its ``baseTimeNanoseconds``), so one file
        shows the loop's waits, the workers' batches and the profiled operators."""
        rec = self._rec
        merged: dict | None = None
        if profiler_trace is None:
            origin, offset_us, pid0 = rec.created, 0.0, 0
        else:
            merged = json.loads(Path(profiler_trace).read_text())
            if not isinstance(merged, dict) or "traceEvents" not in merged:
                raise ValueError(f"`profiler_trace` {str(profiler_trace)!r} is not a Chrome trace with "
                                 "'traceEvents'; pass the file written by prof.export_chrome_trace().")
            # monotonic -> wall clock, read now (exact unless the wall clock was stepped since)
            origin = 0.0
            offset_us = (time.time() - _clock()) * 1e6 - int(merged.get("baseTimeNanoseconds", 0)) / 1e3
            pid0 = 1 << 30  # clear of the profiler's pids (real pids, and device numbers for GPUs)

        def us(t: float) -> float:
            return round((t - origin) * 1e6 + offset_us, 1)

        events: list[dict] = [
            {"name": "process_name", "ph": "M", "pid": 0, "args": {"name": "training loop"}},
            {"name": "thread_name", "ph": "M", "pid": 0, "tid": 0, "args": {"name": "next(): waiting for data"}},
            {"name": "thread_name", "ph": "M", "pid": 0, "tid": 1, "args": {"name": "epochs"}},
        ]
        last_return = None
        for epoch, called, returned in rec.timeline:
            epoch = int(epoch)
            if last_return is not None and last_return[0] == epoch:
                events.append({"name": "step", "ph": "X", "pid": 0, "tid": 0, "ts": us(last_return[1]),
                               "dur": us(called) - us(last_return[1]), "cat": "loop"})
            events.append({"name": "wait", "ph": "X", "pid": 0, "tid": 0, "ts": us(called),
                           "dur": us(returned) - us(called), "cat": "loop", "args": {"epoch": epoch}})
            last_return = (epoch, returned)
        kept_from = rec.timeline[0][1] if rec.timeline else None  # epochs before the kept batches are left out
        for number, began, first, end in rec.marks:
            if kept_from is not None and end is not None and end < kept_from:
                continue
            stop = end if end is not None else (rec.timeline[-1][2] if rec.timeline else began)
            events.append({"name": f"epoch {number}", "ph": "X", "pid": 0, "tid": 1, "ts": us(began),
                           "dur": max(0.0, us(stop) - us(began)), "cat": "epoch"})
            if first is not None:
                label = "time to first batch" if number == 0 else "pause between epochs"
                start = rec.created if number == 0 else began
                events.append({"name": label, "ph": "X", "pid": 0, "tid": 1, "ts": us(start),
                               "dur": us(first) - us(start), "cat": "epoch"})
        workers = rec.workers()
        if workers is not None:
            for w in range(len(workers.busy_s)):
                events.append({"name": "process_name", "ph": "M", "pid": w + 1, "args": {"name": f"worker {w}"}})
            for w, epoch, batch_no, started, done in workers.spans or ():
                w, epoch, batch_no = int(w), int(epoch), int(batch_no)
                events.append({"name": f"batch {batch_no}", "ph": "X", "pid": w + 1, "tid": 0, "ts": us(started),
                               "dur": us(done) - us(started), "cat": "worker",
                               "args": {"epoch": epoch, "batch": batch_no}})
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if merged is None:
            path.write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms",
                                        "otherData": {"summary": self.to_dict()}}))
            return path
        for event in events:
            event["pid"] += pid0
            if event.get("name") == "process_name":
                event["args"]["name"] = "nostall: " + event["args"]["name"]
        merged["traceEvents"].extend(events)
        path.write_text(json.dumps(merged))
        return path
