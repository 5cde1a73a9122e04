"""``num_workers="auto"`` and ``prefetch_factor="auto"``: tuning while the loop runs.

Every control period (at least half a second and a few batches of the loop's own
time) the tuner looks at what the loop did: the share of its time spent waiting
for data, the batches delivered per second, and the CPU the workers used. Then:

* the loop waits (over ``WAITING``): add workers, unless the CPU budget is used up
  (workers that mostly wait on I/O do not count against it); each step that
  raised the delivery rate by ``GAIN`` doubles the next step (1, 2, 4, ... workers),
  so a latency-bound dataset reaches 32 workers in a few seconds; a step that did
  not is taken back, and growing stops there (for ``RETRY_PERIODS`` periods of
  waiting). A change is judged on the period after the next one: new workers
  need a batch's time to start delivering;
* the loop waits although the workers are mostly idle: the window is too small,
  raise ``prefetch_factor`` (up to ``MAX_PREFETCH``);
* the loop never waits (under ``IDLE``): try one worker fewer; if the loop then
  waits, take it back and stay.

A per-batch cost 1.6 times higher or lower than when a limit was learnt lifts the
limits, so the tuner re-settles when the workload changes. Every change and its reason is kept
(``loader.stats.tuner``) and logged. Which worker makes a batch never changes its
content (per-batch seeding), so tuning keeps the determinism contract.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

log = logging.getLogger("nostall")

PERIOD_S = 0.5  # shortest control period
WAITING = 0.05  # the loop waits more than this share of its time: more parallelism may help
IDLE = 0.01  # the loop waits less than this: fewer workers may do
GAIN = 1.05  # an added worker must raise the delivery rate this much to stay
MAX_PREFETCH = 4
CPU_FULL = 0.75  # share of the CPU budget beyond which CPU-bound workers are not added
COST_CHANGE = 1.6  # a batch this many times costlier (or cheaper) than when limits were learnt
RETRY_PERIODS = 10  # periods of waiting at a learnt ceiling before trying above it again


@dataclass
class Decision:
    """One change the tuner made."""

    at_s: float  # seconds since the tuner started
    workers: int
    prefetch: int
    reason: str


@dataclass
class AutoTuner:
    """Chooses the active workers and the prefetch factor from the loop's timings."""

    max_workers: int
    cpu_budget: float
    workers: int
    prefetch: int = 2
    tune_workers: bool = True
    tune_prefetch: bool = True
    decisions: list = field(default_factory=list)
    _started: float = field(default_factory=time.monotonic)
    period_start: float = 0.0  # when the current control period began (monotonic s)
    _wait: float = 0.0
    _work: float = 0.0
    _batches: int = 0
    _last_rate: float = 0.0
    _pending: str = ""  # "add" or "remove": judged at the end of the next period
    _ceiling: int = 0  # workers beyond which adding did not help (0: unknown)
    _floor: int = 1  # workers below which the loop waited
    _cost: float = 0.0  # seconds per batch when the limits were learnt (0: no limits learnt)
    _batch_cost: float = 0.0  # seconds per batch in the last period
    _step: int = 1  # workers the next addition adds
    _settling: bool = False  # the period after a change, not judged
    _at_ceiling: int = 0  # periods the loop waited with growth stopped
    _before: int = 0  # workers before the last addition
    def __post_init__(self) -> None:
        self._ceiling = self.max_workers
        self.period_start = time.monotonic()

    def observe(self, wait_s: float, work_s: float) -> None:
        """One delivered batch: the loop waited ``wait_s`` for it after ``work_s`` of its own."""
        self._wait += wait_s
        self._work += work_s
        self._batches += 1

    def due(self, now: float) -> bool:
        """Whether a control period is over (long enough for a new worker's first batch)."""
        return (now - self.period_start >= max(PERIOD_S, 2 * self._batch_cost)
                and self._batches >= max(4, self.workers))

    def decide(self, now: float, cpu_used: float, cpu_bound: bool, busy: float, batch_cost: float) -> bool:
        """End a period; returns True when ``workers`` or ``prefetch`` changed.

        ``cpu_used``: CPUs the workers kept busy; ``cpu_bound``: whether making a
        batch mostly uses the CPU (rather than waiting on I/O); ``busy``: the
        workers' mean busy share; ``batch_cost``: seconds a worker spends per batch.
        """
        total = self._wait + self._work
        waiting = self._wait / total if total > 0 else 0.0
        rate = self._batches / max(now - self.period_start, 1e-9)
        self.period_start, self._wait, self._work, self._batches = now, 0.0, 0.0, 0
        if self._cost and batch_cost and not self._cost / COST_CHANGE < batch_cost < self._cost * COST_CHANGE:
            self._ceiling, self._floor, self._step = self.max_workers, 1, 1  # the workload changed
            self._note(now, f"the cost per batch changed from {self._cost:.3g} s to {batch_cost:.3g} s: "
                            "tuning again")
            self._cost = 0.0
        self._batch_cost = batch_cost
        pending, self._pending = self._pending, ""
        if pending in ("add", "remove") and not self._settling:
            self._settling, self._pending = True, pending  # new workers are still starting: judge
            return False  # the change on the next period
        self._settling = False
        if pending == "add" and rate < GAIN * self._last_rate:
            self._ceiling, self._step, self._cost = self._before, 1, batch_cost
            return self._set(now, self._before, self.prefetch,
                             f"the last {self.workers - self._before} worker(s) did not raise the rate "
                             f"({rate:.1f} vs {self._last_rate:.1f} batches/s): back, and no more")
        if pending == "add":
            self._step *= 2
        if pending == "remove" and waiting > WAITING:
            self._floor, self._cost = self.workers + 1, batch_cost
            return self._set(now, self.workers + 1, self.prefetch,
                             f"with one worker fewer the loop waited {waiting:.0%}: back")
        self._last_rate = rate
        if waiting > WAITING:
            if self.tune_prefetch and busy < 0.7 and self.prefetch < MAX_PREFETCH:
                return self._set(now, self.workers, self.prefetch + 1,
                                 f"the loop waits {waiting:.0%} while workers are busy only {busy:.0%}: "
                                 "a larger window")
            cpu_full = cpu_bound and cpu_used >= CPU_FULL * self.cpu_budget
            if self.tune_workers and self.workers >= self._ceiling and not cpu_full:
                self._at_ceiling += 1
                if self._at_ceiling >= RETRY_PERIODS:  # still waiting: the limit may have been noise
                    self._ceiling, self._at_ceiling = self.max_workers, 0
            if self.tune_workers and self.workers < self._ceiling and not cpu_full:
                self._pending, self._before = "add", self.workers
                return self._set(now, min(self._ceiling, self.workers + self._step), self.prefetch,
                                 f"the loop waits {waiting:.0%} for data ({rate:.1f} batches/s)")
        elif waiting < IDLE and self.tune_workers and self.workers > self._floor:
            self._pending, self._step = "remove", 1
            return self._set(now, self.workers - 1, self.prefetch,
                             f"the loop waits only {waiting:.1%}: trying one worker fewer")
        return False

    def _set(self, now: float, workers: int, prefetch: int, reason: str) -> bool:
        workers = max(1, min(self.max_workers, workers))
        changed = (workers, prefetch) != (self.workers, self.prefetch)
        self.workers, self.prefetch = workers, prefetch
        if changed:
            self._note(now, reason)
        return changed

    def _note(self, now: float, reason: str) -> None:
        decision = Decision(round(now - self._started, 2), self.workers, self.prefetch, reason)
        self.decisions.append(decision)
        log.info("nostall auto: %d workers, prefetch %d: %s", self.workers, self.prefetch, reason)


MAX_WORKERS = 32  # the most workers "auto" starts (latency-bound datasets gain up to here)


def initial_workers(cpu_budget: float, max_workers: int) -> int:
    """Where "auto" starts: one worker per CPU of the budget."""
    return max(1, min(max_workers, int(cpu_budget)))
