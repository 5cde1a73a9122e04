"""``num_workers="auto"`` and ``prefetch_factor="auto"``: tuning while the loop runs.

Every control period (at least half a second and a few batches of the loop's own
time) the tuner looks at what the loop did: the share of its time spent waiting
for data, its own time per batch (the training step), the workers' seconds and CPU
seconds per batch, and the CPU the whole job used. The workers the loop needs
follow from those (Little's law): a worker's seconds per batch over the loop's
seconds per batch, plus ``HEADROOM``. Then:

* the loop waits (over ``WAITING``): add workers towards that need, at most
  doubling them per step; not when the CPU budget is used up by workers that
  compute (workers that mostly wait on I/O use no CPU and may grow far beyond the
  cores). A step is judged on the period after the next one (new workers need a
  batch's time to start delivering): it stays if the delivery rate rose by
  ``GAIN`` (or by half of what the waiting left to gain) or the waiting halved;
  otherwise it is taken back and growing stops there (for ``RETRY_PERIODS``
  periods of waiting). If a batch's own cost moved meanwhile (the workload
  changed), the rates do not compare and the step stays unjudged. The loop
  waited with the workers it had, so the tuner never goes back below them;
* the loop waits although the workers are mostly idle: the window is too small,
  raise ``prefetch_factor`` (up to ``MAX_PREFETCH``);
* the loop never waits (under ``IDLE``) and fewer workers would do: shrink to the
  need (at most half at once), leaving the CPU to the training step; if the loop
  then waits more than ``BACK`` (a loss of about that share of the rate), take
  the workers back and stay.

A workload change (a batch costing 1.6 times more or less than when a limit was
learnt) lifts the limits, so the tuner re-settles. Every change and its reason is
kept (``loader.stats.tuner``) and logged. Which worker makes a batch never changes
its content (per-batch seeding), so tuning keeps the determinism contract.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field

log = logging.getLogger("nostall")

PERIOD_S = 0.5  # shortest control period
WAITING = 0.05  # the loop waits more than this share of its time: more parallelism may help
IDLE = 0.01  # the loop waits less than this: fewer workers may do
BACK = 0.02  # after workers were removed the loop waits more than this: take them back
HEADROOM = 1.4  # spare parallelism kept above the estimated need
GAIN = 1.05  # added workers must raise the delivery rate this much (or end the waiting) to stay
MAX_PREFETCH = 4
CPU_FULL = 0.75  # share of the CPU budget the job uses beyond which computing workers are not added
COMPUTES = 0.3  # a worker whose CPU seconds are this share of its seconds per batch computes
COST_CHANGE = 1.6  # a batch this many times costlier (or cheaper) than when limits were learnt
CHANGED_UNDER = 1.25  # a change is judged only if a batch's cost moved less than this meanwhile
RETRY_PERIODS = 5  # periods of waiting at a learnt ceiling before trying above it again
DECISIONS_KEPT = 1_000  # changes kept for loader.stats.tuner (the latest): a workload that keeps changing


@dataclass
class Decision:
    """One change the tuner made."""

    at_s: float  # seconds since the tuner started
    workers: int
    prefetch: int
    reason: str
    worker_type: str = ""  # set by the worker_type="auto" decision


@dataclass
class AutoTuner:
    """Chooses the active workers and the prefetch factor from the loop's timings."""

    max_workers: int
    cpu_budget: float
    workers: int
    prefetch: int = 2
    tune_workers: bool = True
    tune_prefetch: bool = True
    decisions: deque = field(default_factory=lambda: deque(maxlen=DECISIONS_KEPT))  # the latest changes
    _started: float = field(default_factory=time.monotonic)
    period_start: float = 0.0  # when the current control period began (monotonic s)
    _wait: float = 0.0
    _work: float = 0.0
    _batches: int = 0
    _last_rate: float = 0.0
    _last_waiting: float = 0.0  # the loop's waiting share in the last judged period
    _pending: str = ""  # "add" or "remove": judged at the end of the next period
    _settling: bool = False  # the period after a change, not judged
    _before: int = 0  # workers before the last change
    _ceiling: int = 0  # workers beyond which adding did not help
    _floor: int = 1  # workers below which the loop waited
    _step: int = 1  # the smallest next addition
    _at_ceiling: int = 0  # periods the loop waited with growth stopped
    _learnt: tuple = ()  # (seconds, CPU seconds) per batch when the limits were learnt
    _batch_cost: float = 0.0  # a worker's seconds per batch in the last period
    _changed_at: float = 0.0  # a batch's own cost in the period that decided the last change

    def __post_init__(self) -> None:
        self._ceiling = self.max_workers
        self.period_start = time.monotonic()

    def begin_period(self, now: float) -> None:
        """Start a control period afresh (what came before says nothing of what follows)."""
        self.period_start, self._wait, self._work, self._batches = now, 0.0, 0.0, 0

    def observe(self, wait_s: float, work_s: float) -> None:
        """One delivered batch: the loop waited ``wait_s`` for it after ``work_s`` of its own."""
        self._wait += wait_s
        self._work += work_s
        self._batches += 1

    def due(self, now: float) -> bool:
        """Whether a control period is over (long enough for a new worker's first batch)."""
        return (now - self.period_start >= max(PERIOD_S, 2 * self._batch_cost)
                and self._batches >= max(4, self.workers))

    def decide(self, now: float, cost: float, cpu_cost: float, cpu_used: float) -> bool:
        """End a period; returns True when ``workers`` or ``prefetch`` changed.

        ``cost``: a worker's seconds per batch; ``cpu_cost``: its CPU seconds per
        batch; ``cpu_used``: CPUs the job (loop and workers) kept busy this period.
        """
        total = self._wait + self._work
        waiting = self._wait / total if total > 0 else 0.0
        rate = self._batches / max(now - self.period_start, 1e-9)
        step_s = max(self._work / max(self._batches, 1), 1e-4)  # the loop's own seconds per batch
        self.begin_period(now)
        self._batch_cost = cost
        computes = cost > 0 and cpu_cost >= COMPUTES * cost
        cpu_full = computes and cpu_used >= CPU_FULL * self.cpu_budget
        self._check_workload(now, cost, cpu_cost, cpu_full)
        pending, self._pending = self._pending, ""
        if pending and not self._settling:
            self._settling, self._pending = True, pending  # new workers are still starting: judge
            return False  # the change on the next period
        self._settling = False
        # A batch's own cost: CPU seconds for computing workers (contention stretches their
        # seconds), seconds for waiting ones.
        intrinsic = cpu_cost if computes else cost
        changed_at, self._changed_at = self._changed_at, intrinsic
        if pending and changed_at and not 1 / CHANGED_UNDER < intrinsic / changed_at < CHANGED_UNDER:
            pending = ""  # the batches' cost moved meanwhile: rates before and after do not compare
        if pending == "add":
            wanted_gain = 1 + min(GAIN - 1, self._last_waiting / 2)  # waiting 4% can give 4% at most
            if rate < wanted_gain * self._last_rate and waiting > self._last_waiting / 2:
                self._ceiling, self._step = self._before, 1
                self._learn(cost, cpu_cost)
                return self._set(now, self._before, self.prefetch,
                                 f"the last {self.workers - self._before} worker(s) did not raise the rate "
                                 f"({rate:.1f} vs {self._last_rate:.1f} batches/s): back, and no more")
            self._step *= 2
            self._floor = max(self._floor, self._before + 1)  # the loop waited with `_before` workers
            self._learn(cost, cpu_cost)
            if self.workers >= self._ceiling:  # growing past a learnt limit paid: it was wrong
                self._ceiling = self.max_workers
        if pending == "remove" and waiting > BACK:
            self._floor = self.workers + 1
            self._learn(cost, cpu_cost)
            return self._set(now, self._before, self.prefetch,
                             f"with {self._before - self.workers} worker(s) fewer the loop waited "
                             f"{waiting:.0%}: back")
        self._last_rate, self._last_waiting = rate, waiting
        # Workers the loop needs: busy ones keep up when a worker's time per batch is
        # covered by the loop's (CPU time when they contend for the cores).
        needed = min(self.max_workers, math.ceil((cpu_cost if cpu_full else cost) / step_s * HEADROOM))
        if waiting > WAITING:
            busy = min(1.0, rate * cost / self.workers)
            if self.tune_prefetch and busy < 0.7 and self.prefetch < MAX_PREFETCH:
                return self._set(now, self.workers, self.prefetch + 1,
                                 f"the loop waits {waiting:.0%} while workers are busy only {busy:.0%}: "
                                 "a larger window")
            if not self.tune_workers or cpu_full:
                return False
            if self.workers >= self._ceiling:
                self._at_ceiling += 1
                if self._at_ceiling < RETRY_PERIODS:
                    return False
                self._ceiling, self._at_ceiling = min(self.max_workers, self.workers + 1), 0  # maybe noise
            grow = max(self._step, min(needed - self.workers, self.workers))
            self._pending, self._before = "add", self.workers
            return self._set(now, min(self._ceiling, self.workers + grow), self.prefetch,
                             f"the loop waits {waiting:.0%} for data ({rate:.1f} batches/s, {_workers(needed)} "
                             "needed)")
        if waiting < IDLE and self.tune_workers:
            target = max(self._floor, self.workers // 2, needed)
            if target < self.workers:
                self._pending, self._before, self._step = "remove", self.workers, 1
                return self._set(now, target, self.prefetch,
                                 f"the loop waits only {waiting:.1%}: {_workers(needed)} would keep up "
                                 f"({rate:.1f} batches/s)")
        return False

    def _learn(self, cost: float, cpu_cost: float) -> None:
        self._learnt = self._learnt or (cost, cpu_cost)

    def _check_workload(self, now: float, cost: float, cpu_cost: float, cpu_full: bool) -> None:
        """Lift the learnt limits when a batch's cost changed (seconds, or CPU seconds
        when the workers contend for the cores and their seconds say little)."""
        if not self._learnt or not cost:
            return
        old_cost, old_cpu = self._learnt
        then, now_cost = (old_cpu, cpu_cost) if cpu_full and old_cpu >= COMPUTES * old_cost else (old_cost, cost)
        if then and not then / COST_CHANGE < now_cost < then * COST_CHANGE:
            self._ceiling, self._floor, self._step, self._learnt = self.max_workers, 1, 1, ()
            self._note(now, f"the cost per batch changed from {then:.3g} s to {now_cost:.3g} s: tuning again")

    def _set(self, now: float, workers: int, prefetch: int, reason: str) -> bool:
        workers = max(1, min(self.max_workers, workers))
        changed = (workers, prefetch) != (self.workers, self.prefetch)
        self.workers, self.prefetch = workers, prefetch
        if changed:
            self._note(now, reason)
        return changed

    def _note(self, now: float, reason: str, worker_type: str = "") -> None:
        decision = Decision(round(now - self._started, 2), self.workers, self.prefetch, reason, worker_type)
        self.decisions.append(decision)
        log.info("nostall auto: %s, prefetch %d: %s", _workers(self.workers), self.prefetch, reason)

    def choose_worker_type(self, now: float, cost: float, cpu_cost: float, drew_global: bool) -> str:
        """``worker_type="auto"``: "thread" for workers that mostly wait (remote reads,
        sleeps: they release the GIL, and threads need no copy of the dataset and no
        process each), else "process". Threads share the global random generators,
        so a dataset drawing from them keeps processes (its batches stay reproducible)."""
        share = cpu_cost / cost if cost > 0 else 1.0
        if drew_global:
            kind, why = "process", ("the dataset draws from the global random generators, which threads "
                                    "share: processes keep its batches reproducible")
        elif share < COMPUTES:
            kind, why = "thread", (f"workers spend {share:.0%} of a batch's time on the CPU (they wait, "
                                   "releasing the GIL): threads, without a process and a dataset copy each")
        else:
            kind, why = "process", (f"workers spend {share:.0%} of a batch's time on the CPU, holding the "
                                    "GIL: processes")
        self._note(now, f"worker_type {kind}: {why}", kind)
        return kind


def _workers(n: int) -> str:
    return "1 worker" if n == 1 else f"{n} workers"


MAX_WORKERS = 32  # the most workers "auto" starts (latency-bound datasets gain up to here)


def initial_workers(cpu_budget: float, max_workers: int) -> int:
    """Where "auto" starts: one worker per CPU of the budget."""
    return max(1, min(max_workers, int(cpu_budget)))
