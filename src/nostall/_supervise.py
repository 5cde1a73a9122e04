"""Supervision bookkeeping: worker restarts, hung batches, skipped samples.

The engine does the mechanics (replace a worker, send its batches again); this
module decides and words it: how many restarts are left, when a batch counts as
hung, whether too many samples were skipped, and the messages that say what
happened, where (worker, pid, sample indices) and what to do.
"""

from __future__ import annotations

import signal
import statistics
from dataclasses import dataclass, field

from . import _diagnose
from ._config import PoolConfig

AUTO_HANG_FLOOR_S = 30.0  # an automatic threshold never goes below this
AUTO_HANG_FACTOR = 20.0  # ... and is this many median batches
AUTO_HANG_UNKNOWN_S = 120.0  # before any batch finished (first batches may open files, warm caches)


POISON_STRIKES = 2  # a batch whose worker died this many times while making it is not tried again


def torch_death_text(exit) -> str:
    """torch's sentence for a dead worker (built in C++ from strsignal), so code and log
    alerts written for torch's DataLoader match nostall's error too."""
    if exit.exitcode is not None and exit.exitcode < 0:
        try:
            name = signal.strsignal(-exit.exitcode) or f"Unknown signal {-exit.exitcode}"
        except ValueError:
            name = f"Unknown signal {-exit.exitcode}"
        text = f"DataLoader worker (pid {exit.pid}) is killed by signal: {name}. "
        if -exit.exitcode == signal.SIGBUS:
            text += ("It is possible that dataloader's workers are out of shared memory. "
                     "Please try to raise your shared memory limit. ")
        return text
    if exit.exitcode is not None:
        return f"DataLoader worker (pid {exit.pid}) exited unexpectedly with exit code {exit.exitcode}. "
    return f"DataLoader worker (pid {exit.pid}) exited unexpectedly. "


class SkippedTooMany(RuntimeError):
    """More of an epoch's samples failed than ``max_skipped_fraction`` allows."""


@dataclass
class Supervisor:
    """Counts and thresholds for one loader's workers."""

    config: PoolConfig
    restarts: list = field(default_factory=list)  # what happened, one line per restart
    oom_baseline: int | None = None
    hung: dict = field(default_factory=dict)  # worker id -> message, for workers nostall killed
    reported: set = field(default_factory=set)  # task ids already reported as hung
    skipped: list = field(default_factory=list)  # (epoch, batch, index, error)
    _skip_counts: dict = field(default_factory=dict)  # plan serial -> samples skipped
    excused: int = 0  # deaths not counted against max_restarts
    in_a_row: int = 0  # failures since a batch was last delivered
    _delivered_at_failure: int = -1  # batches delivered when the last failure was counted
    strikes: dict = field(default_factory=dict)  # (plan serial, batch_no) -> causes of deaths while making it
    factories: dict = field(default_factory=dict)  # a lost factory (its FactoryExit) -> whether it may be replaced

    def pool_started(self) -> None:
        """Note the OOM killer's count now, to tell later whether it fired."""
        self.oom_baseline = _diagnose.oom_kills()

    # -- deaths ------------------------------------------------------------------
    def death_cause(self, worker_id: int, exit, doing: str = "") -> str:
        """Why a worker is gone, in words: killed by nostall after hanging, or its exit
        status and ``doing`` (what it was doing: " while making batch ...")."""
        if worker_id in self.hung:
            return self.hung.pop(worker_id)
        cause = exit.describe(doing)
        # A worker lost with its factory was killed by the kernel: the factory's signal is the clue.
        if (exit.factory.exitcode if exit.factory is not None else exit.exitcode) == -9:
            cause += ". " + _diagnose.oom_evidence(self.oom_baseline)
        return cause

    def may_restart(self, cause: str, excused: bool = False, delivered: int = 0) -> bool:
        """Record a restart; False when more than ``max_restarts`` workers failed in a row
        with no batch delivered in between (``delivered``: batches delivered so far). A
        run that keeps delivering batches restarts workers as often as they die: the
        limit is for a loader that cannot make progress, not a budget for a long run.
        Up to one death per worker from a full /dev/shm (before nostall switched to
        pipes) is excused."""
        self.restarts.append(cause)
        if excused and self.excused < self.config.num_workers:
            self.excused += 1
            return True
        if delivered != self._delivered_at_failure:
            self.in_a_row = 0
        self._delivered_at_failure = delivered
        self.in_a_row += 1
        return self.in_a_row <= self.config.max_restarts

    def lost_with_factory(self, factory, cause: str, delivered: int = 0) -> bool:
        """Record the restart of a worker that died because its factory died (``factory``:
        a ``_pool.FactoryExit``). The factory's death is one failure, however many workers
        it took along: counted, and decided, once, with the first of them."""
        if factory not in self.factories:
            self.factories[factory] = self.may_restart(factory.describe(), delivered=delivered)
        self.restarts.append(cause)
        return self.factories[factory]

    def strike(self, key: tuple, cause: str) -> list:
        """Record that a worker died (or hung) while making batch ``key``; return the
        causes of that batch's earlier deaths."""
        earlier = self.strikes.setdefault(key, [])
        before = list(earlier)
        earlier.append(cause)
        return before

    def poisoned(self, head: str, cause: str, earlier: list) -> str:
        """The error for a batch that ended its worker every time it was made."""
        return (f"{head}nostall: {cause.rstrip('.')}. That batch had already ended a worker before "
                f"({'; '.join(earlier)}). A batch that ends its worker every time it is made (a poison "
                "batch: e.g. a segfault in a decoder, or a sample that never finishes) is not tried again; "
                "the loader was closed. Find the sample: load those indices with num_workers=0 (a crash "
                "then shows where it happens), fix or leave it out, and iterate again on a new loader.")

    def gave_up(self, head: str, cause: str, held: list, iterable: bool) -> str:
        """The error when a worker cannot be replaced: ``head`` is torch's sentence (empty
        for a worker nostall stopped)."""
        if iterable:
            why = ("An iterable dataset's stream cannot be resumed in a new worker, so the epoch "
                   "cannot complete.")
        else:
            why = (f"That is {self.in_a_row} worker failure{'s' if self.in_a_row != 1 else ''} in a row with no "
                   f"batch delivered in between, more than max_worker_restarts={self.config.max_restarts}.")
        detail = f" It held the batches with sample indices {held}." if held and not iterable else ""
        return (f"{head}nostall: {cause.rstrip('.')}.{detail} {why} The loader was closed; fix the cause "
                "(memory limit, a crash in a C extension, os._exit or an endless loop in dataset code) or "
                "raise max_worker_restarts, and iterate again on a new loader.")

    # -- hangs -------------------------------------------------------------------
    def hang_threshold(self, costs: list[float]) -> tuple[float, str]:
        """Seconds after which a batch counts as hung, and how that was set."""
        if self.config.hang_timeout is not None:
            return float(self.config.hang_timeout), f"hang_timeout={self.config.hang_timeout:g}"
        if not costs:
            return AUTO_HANG_UNKNOWN_S, f"automatic: {AUTO_HANG_UNKNOWN_S:g} s until a batch has finished"
        median = statistics.median(costs)
        threshold = max(AUTO_HANG_FLOOR_S, AUTO_HANG_FACTOR * median)
        return threshold, (f"automatic: {AUTO_HANG_FACTOR:g} x the median batch of {median:.3g} s, at "
                           f"least {AUTO_HANG_FLOOR_S:g} s; set hang_timeout to change it")

    def hang_message(self, worker: str, what: str, elapsed: float, threshold: str, stack: str | None) -> str:
        """What a hung batch looks like, with the worker's stack."""
        stack_text = f" Its Python stack:\n{stack}" if stack else " (Its stack could not be read.)"
        return f"{worker} has been making {what} for {elapsed:.1f} s ({threshold}).{stack_text}"

    # -- skipped samples -------------------------------------------------------------
    def record_skipped(self, plan, batch_no: int, skipped: tuple, epoch_samples: int | None) -> None:
        """Add a batch's skipped samples; raise :class:`SkippedTooMany` over the limit."""
        for index, error in skipped:
            self.skipped.append((plan.number, batch_no, index, error))
        count = self._skip_counts[plan.serial] = self._skip_counts.get(plan.serial, 0) + len(skipped)
        limit = self.config.max_skipped_fraction * (epoch_samples or 0)
        if epoch_samples and count > limit:
            first = [f"index {i}: {e}" for ep, _, i, e in self.skipped if ep == plan.number][:5]
            raise SkippedTooMany(
                f"epoch {plan.number}: {count} of its {epoch_samples} samples failed and were skipped, "
                f"more than max_skipped_fraction={self.config.max_skipped_fraction:g} "
                f"({limit:.0f} samples). First failures: " + "; ".join(first) + ". Fix those samples "
                "(loader.stats.skipped lists every one) or raise max_skipped_fraction."
            )
