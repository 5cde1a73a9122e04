"""The engine: a bounded window of batches in flight, delivered in plan order.

It keeps up to ``window`` batches in flight (submitted, being made, or made and
waiting for their turn), hands each to the worker expected to finish it first
(see ``_schedule``, which also spreads the workers' phases), and when the current
epoch's sampler is exhausted it goes on with the next epoch's plan (see ``_plan``),
so workers never idle at an epoch boundary. The whole window may go to the next
epoch before its ``iter()``: with many workers sharing few cores, a full window
is what has the next epoch's first batches ready in time (measured: capping it
at one batch per worker brought back pauses of 0.1-0.25 s at 8 workers). The
price is at most one window of batches made after the last epoch, for nothing.
Results of work that is no longer
wanted (an abandoned epoch, a wrong prediction) are dropped when they arrive; they
still count against the window until then, so the bound always holds.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

from torch.utils.data._utils.pin_memory import pin_memory as _pin

from . import _seeding
from ._config import PoolConfig
from ._plan import EpochPlan, Planner, object_state
from ._pool import ProcessPool, ThreadPool, WorkerExit
from ._schedule import Scheduler
from ._stats import WorkerLog
from ._worker import BatchMaker, Pause, Result, Task, WorkSpec


@dataclass
class _InFlight:
    plan: EpochPlan
    batch_no: int
    worker_id: int
    indices: object
    wanted: bool = True


class Engine:
    """Runs epochs for one loader. Holds no reference to the loader object itself."""

    def __init__(self, config: PoolConfig, planner: Planner, spec: WorkSpec, ctx, pin_device):
        self.config = config
        self.planner = planner
        self.spec = spec
        self._ctx = ctx
        self._pin_device = pin_device
        self.pool = None
        self._inline: BatchMaker | None = None
        self._task_ids = itertools.count()
        self._inflight: dict[int, _InFlight] = {}
        self._ready: dict[tuple, Result] = {}  # (plan serial, batch_no) -> result
        self._arrivals: list = []  # keys in arrival order, for in_order=False
        self._sched = Scheduler(0)
        self.worker_log: WorkerLog | None = None  # for loader.stats
        self._worker_dstate: dict[int, dict] = {}
        self._current: EpochPlan | None = None
        self._deliver_no = 0
        self._rr = None  # iterable datasets: round-robin over active workers
        self._active: set = set()
        self._skipped: set = set()
        self.closed = False

    # -- epochs -----------------------------------------------------------------
    def begin_epoch(self) -> EpochPlan:
        """Start a new epoch: abandon the unfinished one, reuse or discard work prepared ahead."""
        if self.closed:
            raise RuntimeError("this nostall DataLoader was closed; create a new one to load again")
        if not self.config.persistent and self.pool is not None:
            self._close_pool()
        plan = self.planner.begin()
        for task in self._inflight.values():
            if task.plan is not plan:
                task.wanted = False  # an abandoned epoch or a discarded prediction
        self._ready = {k: r for k, r in self._ready.items() if k[0] == plan.serial}
        self._arrivals = [k for k in self._arrivals if k in self._ready]
        self._current = plan
        self._deliver_no = 0
        self._skipped = set()
        if self.config.num_workers == 0:
            if self._inline is None:
                self._inline = BatchMaker(self.spec, self.planner.base_seed, None, seed_globals=True)
        elif self.pool is None:
            self._start_pool()
        if self.planner.iterable:
            self._active = set(range(self.config.num_workers))
            self._rr = itertools.cycle(range(self.config.num_workers))
        return plan

    def _start_pool(self) -> None:
        n, seed = self.config.num_workers, self.planner.base_seed
        if self.config.worker_type == "thread":
            self.pool = ThreadPool(self.spec, n, seed)
        else:
            self.pool = ProcessPool(self._ctx, self.spec, n, seed)
        self._sched = Scheduler(n)
        if self.worker_log is None:
            self.worker_log = WorkerLog(n, self.config.window)
        start_state = object_state(self.spec.dataset)
        self._worker_dstate = {w: start_state for w in range(n)}

    # -- the hot path -------------------------------------------------------------
    def next_batch(self, plan: EpochPlan):
        """The next batch of ``plan``; raises StopIteration at the end of its epoch."""
        if plan is not self._current:
            raise RuntimeError(
                "this iterator was superseded by a newer iter(loader); a nostall DataLoader "
                "runs one epoch at a time, so take batches from the newest iterator"
            )
        if self._inline is not None:
            return self._next_inline(plan)
        while True:
            result = self._take_ready(plan)
            if result is not None:
                self.worker_log.delivered(self._occupancy() + 1)  # the pool exists: results came from it
                self._fill()  # the slot it held goes to new work before the user's step
                return self._deliver(result)
            self._fill()
            if self._epoch_done(plan):
                if not self.config.persistent:
                    self._close_pool()
                raise StopIteration
            timeout = self.config.timeout or None
            arrived = self.pool.poll(timeout)
            if not arrived and timeout is not None and not self.pool.poll_progressed:
                raise RuntimeError(
                    f"DataLoader timed out after {self.config.timeout} seconds: no batch arrived "
                    f"from {self.config.num_workers} workers (`timeout` argument). A worker may be "
                    "stuck in the dataset's __getitem__; raise `timeout` or find the slow sample."
                )
            for worker_id, result in arrived:
                self._receive(worker_id, result)

    def _next_inline(self, plan: EpochPlan):
        while True:
            item = self.planner.pull(plan)
            if item is None:
                raise StopIteration
            batch_no, indices = item
            with _seeding.saved_global_rng():
                result = self._inline.make(Task(-1, plan.number, batch_no, indices))
            if result.kind == "stop":
                plan.exhausted = True
                raise StopIteration
            return self._deliver(result)

    def _take_ready(self, plan: EpochPlan):
        if not self.config.in_order:
            for i, key in enumerate(self._arrivals):
                if key[0] == plan.serial:
                    del self._arrivals[i]
                    return self._ready.pop(key)
            return None
        while self._deliver_no in self._skipped:
            self._skipped.discard(self._deliver_no)
            self._deliver_no += 1
        result = self._ready.pop((plan.serial, self._deliver_no), None)
        if result is not None:
            self._deliver_no += 1
        return result

    def _deliver(self, result: Result):
        if result.kind == "error":
            result.payload.reraise()
        data = result.payload
        if self._pin_device is not None:
            data = _pin(data, self._pin_device)
        return data

    def _epoch_done(self, plan: EpochPlan) -> bool:
        if self.planner.iterable and not self._active:
            plan.exhausted = True
        if not plan.exhausted:
            return False
        return not any(t.plan is plan and t.wanted for t in self._inflight.values()) and not any(
            k[0] == plan.serial for k in self._ready
        )

    def _occupancy(self) -> int:
        return len(self._inflight) + len(self._ready)

    def _fill(self) -> None:
        window = self.config.window
        while self._occupancy() < window:
            plan = self._current
            if plan.exhausted:
                if not self.config.persistent:
                    return
                plan = self.planner.plan_ahead()
                if plan is None or plan.exhausted:
                    return
            worker_id = self._pick_worker(plan)
            if worker_id is None:
                return
            item = self.planner.pull(plan)
            if item is None:
                continue
            batch_no, indices = item
            self._submit(worker_id, plan, batch_no, indices)

    def _pick_worker(self, plan: EpochPlan):
        if self.planner.iterable:
            if plan is not self._current or not self._active:
                return None
            for worker_id in self._rr:
                if worker_id in self._active:
                    return worker_id
        return self._sched.pick(time.monotonic())

    def _submit(self, worker_id: int, plan: EpochPlan, batch_no: int, indices) -> None:
        if self.pool.passes_attrs:
            self._sync_dataset(worker_id, plan)
        task_id = next(self._task_ids)
        self._inflight[task_id] = _InFlight(plan, batch_no, worker_id, indices)
        self._sched.submitted(worker_id, time.monotonic())
        self.pool.submit(worker_id, Task(task_id, plan.number, batch_no, indices))

    def _sync_dataset(self, worker_id: int, plan: EpochPlan) -> None:
        """Send the worker the dataset attributes it lacks for this plan (set_epoch & co)."""
        target = plan.assumed["dataset"][1]
        have = self._worker_dstate[worker_id]
        if have is target or have == target:
            self._worker_dstate[worker_id] = target
            return
        dataset = self.spec.dataset
        attrs = {
            name: value if not (isinstance(value, tuple) and value[:1] == ("<object>",)) else getattr(dataset, name)
            for name, value in target.items()
            if have.get(name) != value
        }
        self.pool.submit(worker_id, attrs)
        self._worker_dstate[worker_id] = target

    def _receive(self, worker_id: int, result: Result) -> None:
        if result.kind == "died":
            self._worker_died(worker_id, result.payload)
        if result.task_id == -1:  # failed while starting: nothing can run
            self.close()
            result.payload.reraise()
        task = self._inflight.pop(result.task_id)
        if result.done:
            self.worker_log.made(worker_id, task.plan.number, task.batch_no, result.started, result.done)
        for worker, seconds in self._sched.answered(worker_id, result.started, result.done, result.cpu).items():
            self.pool.submit(worker, Pause(seconds))
        if not task.wanted:
            return
        if result.kind == "stop":
            self._active.discard(worker_id)
            self._skipped.add(task.batch_no)
            return
        key = (task.plan.serial, task.batch_no)
        self._ready[key] = result
        if not self.config.in_order:
            self._arrivals.append(key)

    def _worker_died(self, worker_id: int, exit: WorkerExit) -> None:
        held = [t.indices for t in self._inflight.values() if t.worker_id == worker_id and t.wanted]
        self.close()
        detail = f" It held the batches with sample indices {held}." if held and not self.planner.iterable else ""
        raise RuntimeError(
            f"{exit.describe()}.{detail} The loader was closed; fix the cause (memory limit, "
            "a crash in a C extension, os._exit in dataset code) and iterate again on a new loader."
        )

    # -- lifecycle ------------------------------------------------------------
    def worker_pids(self) -> list:
        """Pids of the live worker processes (empty for threads and in-process loading)."""
        if self.pool is None:
            return []
        return sorted(self.pool.wait_started().values())

    def _close_pool(self) -> None:
        pool, self.pool = self.pool, None
        if pool is not None:
            pool.close()
        for task in self._inflight.values():
            task.wanted = False
        self._inflight.clear()
        self._sched = Scheduler(0)

    def close(self) -> None:
        """Release every worker; idempotent and safe to call from a finalizer."""
        self.closed = True
        self._close_pool()
        self._ready.clear()
        self._arrivals.clear()
