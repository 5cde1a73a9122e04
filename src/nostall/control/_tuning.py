"""Driving ``AutoTuner`` for ``num_workers="auto"``, ``prefetch_factor="auto"`` and
``worker_type="auto"``: the loop's timings and the workers' CPU go in, a decision
comes out (start or activate workers, switch to threads), which the engine applies.
"""

from __future__ import annotations

import time

from ._autotune import AutoTuner, initial_workers
from .._config import PoolConfig
from ..observe._cpus import local_cpu_budget


class TuningDriver:
    """One loader's auto-tuning state (see the module docstring); ``tuner`` is None
    until a pool starts with something to tune."""

    def __init__(self, config: PoolConfig):
        self.config = config
        self.tuner: AutoTuner | None = None
        self.kind_open = config.worker_type == "auto"  # worker type not chosen yet (processes until then)
        self.drew_global = False  # a watched batch drew from the global RNGs
        self.loop_returned = 0.0  # when the loop last got a batch
        self.polled = 0.0  # seconds the current next_batch call waited for workers
        self.cpu = (0.0, 0.0)  # this process's CPU time at the period start, workers' CPU since

    def start(self, n: int, budget: float | None = None) -> int | None:
        """A pool of up to ``n`` workers starts: how many to start (None: all of them).
        ``budget``: the CPUs the workers may use (default: this machine's, for this rank)."""
        config = self.config
        if not (config.auto_workers or config.auto_prefetch or self.kind_open):
            return None
        if self.tuner is None:
            if budget is None:
                budget = local_cpu_budget()  # usable CPUs shared among this machine's ranks
            first = initial_workers(budget, n) if config.auto_workers else n
            self.tuner = AutoTuner(n, budget, first, config.prefetch_factor or 2,
                                   tune_workers=config.auto_workers, tune_prefetch=config.auto_prefetch)
        return self.tuner.workers

    def pool_started(self) -> None:
        """CPU accounting starts over with a new pool."""
        self.cpu = (time.process_time(), 0.0)

    def received(self, result) -> None:
        """A process worker's batch arrived: count its CPU (threads count in process_time)."""
        self.cpu = (self.cpu[0], self.cpu[1] + result.cpu)
        self.drew_global |= result.drew_global

    def delivered(self, called: float, sched) -> str | None:
        """Feed the tuner one delivery (``called``: when ``next_batch`` was called); at the
        end of a period: ``"thread"`` (switch to thread workers), ``"apply"`` (apply
        ``tuner.workers``) or None."""
        now = time.monotonic()
        tuner = self.tuner
        if self.loop_returned:  # waiting: blocked on workers; working: the loop's own step
            tuner.observe(self.polled, called - self.loop_returned)
        else:  # the first batch: judge from here on, not from the workers' start-up
            tuner.begin_period(now)
            self.cpu = (time.process_time(), 0.0)
        self.loop_returned = now
        if not tuner.due(now):
            return None
        active = sched.active
        span = max(now - tuner.period_start, 1e-9)
        cpu_now = time.process_time()  # this process: the loop, and thread workers if any
        cpu_used = (cpu_now - self.cpu[0] + self.cpu[1]) / span
        self.cpu = (cpu_now, 0.0)
        costs = sorted(sched.costs(active))
        cpu_costs = sorted(sched.costs(active, cpu=True))
        if not costs:
            return None
        cost, cpu_cost = costs[len(costs) // 2], cpu_costs[len(cpu_costs) // 2]
        if self.kind_open:
            self.kind_open = False
            if tuner.choose_worker_type(now, cost, cpu_cost, self.drew_global) == "thread":
                return "thread"
        if tuner.decide(now, cost, cpu_cost, cpu_used):
            return "apply"
        return None

    def switched(self) -> None:
        """The switch to threads is done: it is neither waiting nor the loop's work."""
        self.loop_returned = time.monotonic()
        self.tuner.begin_period(self.loop_returned)
