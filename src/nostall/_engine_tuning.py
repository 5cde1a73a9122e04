"""The engine's part in ``num_workers="auto"``, ``prefetch_factor="auto"`` and
``worker_type="auto"``: feed ``AutoTuner`` the loop's timings and the workers' costs,
and apply what it decides (start or activate workers, switch to threads).
It works on ``Engine``'s state (pool, scheduler, tuner).
"""

from __future__ import annotations

import time


class Tuning:
    """Auto-tuning methods of ``Engine`` (see the module docstring)."""

    def _tune(self, called: float) -> None:
        """Feed the tuner one delivery; at the end of a period apply what it decides."""
        now = time.monotonic()
        tuner = self.tuner
        if self._loop_returned:  # waiting: blocked on workers; working: the loop's own step
            tuner.observe(self._polled, called - self._loop_returned)
        else:  # the first batch: judge from here on, not from the workers' start-up
            tuner.begin_period(now)
            self._tuned_cpu = (time.process_time(), 0.0)
        self._loop_returned = now
        if not tuner.due(now):
            return
        active = self._sched.active
        span = max(now - tuner.period_start, 1e-9)
        cpu_now = time.process_time()  # this process: the loop, and thread workers if any
        cpu_used = (cpu_now - self._tuned_cpu[0] + self._tuned_cpu[1]) / span
        self._tuned_cpu = (cpu_now, 0.0)
        costs = sorted(self._sched.costs(active))
        cpu_costs = sorted(self._sched.costs(active, cpu=True))
        if not costs:
            return
        cost, cpu_cost = costs[len(costs) // 2], cpu_costs[len(cpu_costs) // 2]
        if self._kind_open:
            self._kind_open = False
            if tuner.choose_worker_type(now, cost, cpu_cost, self._drew_global) == "thread":
                self._switch_to_threads()
                self._loop_returned = time.monotonic()  # the switch is neither waiting nor the loop's work
                tuner.begin_period(self._loop_returned)
                return
        if tuner.decide(now, cost, cpu_cost, cpu_used):
            self._apply_tuning()

    def _switch_to_threads(self) -> None:
        """worker_type="auto" chose threads: the process workers finish the batches they
        hold (delivered as usual), then thread workers take over. Threads share the
        user's dataset object, so an epoch prepared ahead from a predicted dataset
        state is made again when allowed."""
        while self._inflight:
            for worker_id, result in self._poll(self._current):
                self._receive(worker_id, result)
            self._check_hangs()
        self._close_pool()
        self._kind = "thread"
        self.planner.dataset_in_workers = False
        self.planner.discard_ahead()
        current = self._current.serial
        self._ready = {k: r for k, r in self._ready.items() if k[0] == current}
        self._arrivals = [k for k in self._arrivals if k in self._ready]
        if self._pinner is not None:
            self._pinner.keep_only(r.task_id for r in self._ready.values())
        self._start_pool()

    def _apply_tuning(self) -> None:
        wanted = self.tuner.workers
        while self._started_workers < wanted:
            self.pool.add(self._started_workers)
            self._sched.add_worker(self._started_workers)
            self._started_workers += 1
        self.worker_log.started_workers = self._started_workers
        self._sched.active = set(range(wanted))
