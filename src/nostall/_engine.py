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
import signal
import time
import warnings
from dataclasses import dataclass

from torch.utils.data._utils.pin_memory import pin_memory as _pin

from . import _diagnose, _limits, _resume, _seeding, _transport
from ._autotune import AutoTuner, initial_workers
from ._config import PoolConfig
from ._distributed import local_cpu_budget
from ._plan import EpochPlan, Planner, object_state
from ._pool import ProcessPool, ThreadPool, WorkerExit
from ._resume import Streams
from ._schedule import Scheduler
from ._stats import WorkerLog
from ._supervise import Supervisor
from ._worker import BatchMaker, Pause, PipeOnly, Result, Resume, Task, WorkSpec


_COPY_ON_READ_WARN_BYTES = 32 * 2**20  # below this, copies per worker are not worth a warning
_warned_copy_on_read = False


def _warn_copy_on_read(dataset, num_workers: int) -> None:
    """Once per process: point a dataset holding large Python containers to nostall.flat."""
    global _warned_copy_on_read
    if _warned_copy_on_read:
        return
    from ._doctor import find_large_containers  # only when workers start: a few ms

    large = [c for c in find_large_containers(dataset) if c.nbytes >= _COPY_ON_READ_WARN_BYTES]
    if not large:
        return
    _warned_copy_on_read = True
    c = max(large, key=lambda c: c.nbytes)
    attr = c.path.split(".", 1)[1] if c.path.startswith("dataset.") else c.path
    warnings.warn(
        f"{c.path} is a {c.kind} of {c.count:,} Python objects (~{c.nbytes / 2**20:,.0f} MB). Each of the "
        f"{num_workers} workers copies the pages it reads (reading updates reference counts; "
        f"pytorch/pytorch#13246): up to ~{c.nbytes * num_workers / 2**20:,.0f} MB more. Store it flat in the "
        f"dataset's __init__: `self.{attr} = nostall.flat(self.{attr})`. (`nostall doctor --dataset ...` "
        "lists every such container.)",
        UserWarning,
        stacklevel=5,
    )


@dataclass
class _InFlight:
    plan: EpochPlan
    batch_no: int
    worker_id: int
    indices: object
    submitted: float = 0.0
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
        self._last_done: dict[int, float] = {}  # worker -> when it last finished a batch
        self.supervisor = Supervisor(config)
        self._shm_checked = False
        self._epoch_over = False  # the current epoch raised StopIteration
        self._delivered: set = set()  # batch numbers delivered this epoch (in_order=False)
        self._resume = None  # the loaded state, applied by the next begin_epoch
        self._prefix = 0  # in_order=False: batches 0.._prefix-1 are all delivered (see _delivered_prefix)
        self._streams: Streams | None = None  # iterable datasets: each worker's position (for resume)
        self._made_by: dict = {}  # iterable datasets: key of a ready batch -> (worker, state, ended)
        self._batch_bytes = 0  # largest batch seen, in tensor bytes (for max_inflight_bytes)
        self.tuner: AutoTuner | None = None  # num_workers="auto" / prefetch_factor="auto" / worker_type="auto"
        self._kind = "thread" if config.worker_type == "thread" else "process"  # the pool's workers
        self._kind_open = config.worker_type == "auto"  # not chosen yet (processes until then)
        self._drew_global = False  # a watched batch drew from the global RNGs
        self._started_workers = 0
        self._loop_returned = 0.0  # when the loop last got a batch (for the tuner)
        self._polled = 0.0
        self._tuned_cpu = (0.0, 0.0)  # this process's CPU time at the period start, workers' CPU since
        self._pipe_only: str | None = None  # why batches no longer go through /dev/shm
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
        self._epoch_over = False
        self._delivered = set()
        self._prefix = 0
        resume, self._resume = self._resume, None
        if resume is not None:
            self._skip_delivered(plan, resume)
        self._epoch_samples = self.planner.epoch_samples()
        if self.worker_log is None:
            self.worker_log = WorkerLog(self.config.num_workers, self.config.window, self.supervisor)
        if self.config.num_workers == 0:
            if self._inline is None:
                self._inline = BatchMaker(self.spec, self.planner.base_seed, None, seed_globals=True)
        elif self.pool is None:
            self._start_pool()
        if self.planner.iterable:
            self._begin_streams(plan, resume["streams"] if resume is not None else None)
        return plan

    def _start_pool(self) -> None:
        n, seed = self.config.num_workers, self.planner.base_seed
        start = None
        if self.config.auto_workers or self.config.auto_prefetch or self._kind_open:
            if self.tuner is None:
                budget = local_cpu_budget()  # usable CPUs shared among this machine's ranks
                first = initial_workers(budget, n) if self.config.auto_workers else n
                self.tuner = AutoTuner(n, budget, first, self.config.prefetch_factor or 2,
                                       tune_workers=self.config.auto_workers,
                                       tune_prefetch=self.config.auto_prefetch)
                self.worker_log.tuner = self.tuner
            start = self.tuner.workers
        if self._kind == "thread":
            self.pool = ThreadPool(self.spec, n, seed, start)
        else:
            _limits.ensure_open_files(n, max(1, self.config.prefetch_factor))
            _warn_copy_on_read(self.spec.dataset, n)
            self.pool = ProcessPool(self._ctx, self.spec, n, seed, start)
            if self._pipe_only:
                for w in range(n):
                    self.pool.submit(w, PipeOnly(self._pipe_only))
        self._started_workers = n if start is None else start
        self.worker_log.started_workers = self._started_workers
        self._sched = Scheduler(self._started_workers)
        self._tuned_cpu = (time.process_time(), 0.0)
        self._last_done = {}
        self.supervisor.pool_started()
        self._start_dstate = object_state(self.spec.dataset)
        self._worker_dstate = {w: self._start_dstate for w in range(n)}

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
        called = time.monotonic() if self.tuner is not None else 0.0
        self._polled = 0.0  # seconds this call spent waiting for workers (for the tuner)
        while True:
            result = self._take_ready(plan)
            if result is not None:
                self.worker_log.delivered(self._occupancy() + 1)  # the pool exists: results came from it
                if self.tuner is not None:
                    self._tune(called)
                self._fill()  # the slot it held goes to new work before the user's step
                return self._deliver(result)
            self._fill()
            if self._epoch_done(plan):
                self._epoch_over = True
                if not self.config.persistent:
                    self._close_pool()
                raise StopIteration
            arrived = self._poll(plan)
            for worker_id, result in arrived:
                self._receive(worker_id, result)
            self._check_hangs()

    def _poll(self, plan: EpochPlan) -> list:
        """Wait for results, waking at least once a second to look for hung batches;
        raise torch's timeout error when ``timeout`` seconds pass with nothing new."""
        timeout = self.config.timeout or None
        if plan.waiting_since is None:
            plan.waiting_since = time.monotonic()
        wait = 1.0 if timeout is None else min(1.0, max(0.0, plan.waiting_since + timeout - time.monotonic()))
        arrived = self.pool.poll(wait)
        now = time.monotonic()
        self._polled += self.pool.blocked
        if arrived or self.pool.poll_progressed:
            plan.waiting_since = now
        elif timeout is not None and now - plan.waiting_since >= timeout:
            raise RuntimeError(
                f"DataLoader timed out after {self.config.timeout} seconds: no batch arrived "
                f"from {self.config.num_workers} workers (`timeout` argument). A worker may be "
                "stuck in the dataset's __getitem__; raise `timeout` or find the slow sample."
            )
        return arrived

    def _next_inline(self, plan: EpochPlan):
        while True:
            item = self.planner.pull(plan)
            if item is None:
                self._epoch_over = True
                raise StopIteration
            batch_no, indices = item
            if batch_no in plan.skip:
                continue
            with _seeding.saved_global_rng():
                result = self._inline.make(Task(-1, plan.number, batch_no, indices))
            if result.kind == "stop":
                plan.exhausted = True
                raise StopIteration
            if result.skipped:
                self.supervisor.record_skipped(plan, batch_no, result.skipped, self._epoch_samples)
            if result.kind == "empty":
                continue
            if self._streams is not None:
                self._streams.delivered(0, result.state, result.ended)
            elif plan.sampler_states is not None:
                plan.forget_before(batch_no)
            return self._deliver(result)

    def _take_ready(self, plan: EpochPlan):
        while True:
            result = self._take_next_ready(plan)
            if result is None or result.kind != "empty":
                return result  # an "empty" batch (every sample skipped) is passed over

    def _take_next_ready(self, plan: EpochPlan):
        if not self.config.in_order:
            for i, key in enumerate(self._arrivals):
                if key[0] == plan.serial:
                    del self._arrivals[i]
                    self._delivered.add(key[1])
                    if self._streams is not None or plan.sampler_states is not None:
                        self._track_delivery(plan, key)
                    return self._ready.pop(key)
            return None
        while self._deliver_no in self._skipped:
            self._skipped.discard(self._deliver_no)
            self._deliver_no += 1
        result = self._ready.pop((plan.serial, self._deliver_no), None)
        if result is not None:
            self._deliver_no += 1
            if self._streams is not None or plan.sampler_states is not None:
                self._track_delivery(plan, (plan.serial, self._deliver_no - 1))
        return result

    def _track_delivery(self, plan: EpochPlan, key: tuple) -> None:
        """Resume bookkeeping for a delivered batch (iterable datasets, stateful samplers only)."""
        if self._streams is not None:
            self._streams.delivered(*self._made_by.pop(key))
        if plan.sampler_states is not None:  # keep the state after the last delivered batch
            upto = self._deliver_no if self.config.in_order else self._delivered_prefix(plan)
            plan.forget_before(upto - 1)

    def _delivered_prefix(self, plan: EpochPlan) -> int:
        """in_order=False: n such that batches 0..n-1 are all delivered and the sampler
        state after batch n-1 is known (drawn in this run, or the one loaded)."""
        while self._prefix in self._delivered:
            self._prefix += 1
        return min(self._prefix, plan.next_batch_no)

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
        tuner = self.tuner
        if tuner is None:
            window = self.config.window_for(self._batch_bytes)
        else:
            window = self.config.window_for(self._batch_bytes, tuner.workers, tuner.prefetch)
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
            if batch_no in plan.skip:
                continue  # delivered before the state was saved
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
        now = time.monotonic()
        self._inflight[task_id] = _InFlight(plan, batch_no, worker_id, indices, now)
        self._sched.submitted(worker_id, now)
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
            self._replace(worker_id, result.payload)
            return
        if result.task_id == -1:  # failed while starting: nothing can run
            self.close()
            result.payload.reraise()
        task = self._inflight.pop(result.task_id)
        if result.done:
            self._last_done[worker_id] = result.done
            self.worker_log.made(worker_id, task.plan.number, task.batch_no, result.started, result.done)
        if self.tuner is not None and self._kind != "thread":  # threads count in process_time
            self._tuned_cpu = (self._tuned_cpu[0], self._tuned_cpu[1] + result.cpu)
            self._drew_global |= result.drew_global
        for worker, seconds in self._sched.answered(worker_id, result.started, result.done, result.cpu).items():
            self.pool.submit(worker, Pause(seconds))
        if not task.wanted:
            return
        if result.kind == "stop":
            self._active.discard(worker_id)
            self._skipped.add(task.batch_no)
            self._streams.stopped(worker_id, task.batch_no)
            return
        if result.skipped:
            samples = self._epoch_samples if task.plan is self._current else self.planner.epoch_samples()
            self.supervisor.record_skipped(task.plan, task.batch_no, result.skipped, samples)
        if result.note.startswith("shm-full: "):
            self._go_pipe_only(f"worker {worker_id} could not put a batch in /dev/shm "
                               f"({result.note[len('shm-full: '):]}; {self._shm_text()})")
        if not self._shm_checked and result.kind == "ok" and self.pool.passes_attrs:
            self._check_shm(result.payload)
        if self.config.max_inflight_bytes is not None and result.kind == "ok":
            self._batch_bytes = max(self._batch_bytes, _transport.tensor_bytes(result.payload))
        key = (task.plan.serial, task.batch_no)
        self._ready[key] = result
        if self._streams is not None:
            self._made_by[key] = (worker_id, result.state, result.ended)
        if not self.config.in_order:
            self._arrivals.append(key)

    # -- num_workers="auto" -------------------------------------------------------------
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
        self._start_pool()

    def _apply_tuning(self) -> None:
        wanted = self.tuner.workers
        while self._started_workers < wanted:
            self.pool.add(self._started_workers)
            self._sched.add_worker(self._started_workers)
            self._started_workers += 1
        self.worker_log.started_workers = self._started_workers
        self._sched.active = set(range(wanted))

    # -- resume ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Where the loop is: the epoch, the batches of it already delivered, and what
        the epoch's order depends on (see ``Planner.state`` and ``_resume``)."""
        plan = self._current
        if plan is None or self._epoch_over:
            return self._state_between(plan)
        if self._inline is not None:  # in-process loading delivers in order
            delivered = upto = plan.next_batch_no
            if plan.skip:  # resumed from an out-of-order save: some later batches came before
                delivered = sorted(set(range(upto)) | plan.skip)
        elif self.config.in_order:
            delivered = upto = self._deliver_no
        else:
            delivered = sorted(self._delivered)
            upto = self._delivered_prefix(plan)  # a stateful sampler is saved after this prefix
        count = delivered if isinstance(delivered, int) else len(delivered)
        if count == self.planner.epoch_batches():  # all delivered; the loop just did not ask again
            return self._state_between(plan)  # (Lightning stops at len(loader))
        streams = None
        if self._streams is not None:
            pending = {made[0] for made in self._made_by.values()}  # made, not yet delivered
            # A worker whose stream ended with every batch of it delivered sits out the rest.
            exhausted = [w for w in self._streams.stops if w not in pending]
            streams = self._streams.save(self.config.num_workers, exhausted)
        return dict(self.planner.state(plan, upto), delivered=delivered, streams=streams)

    def _state_between(self, finished: EpochPlan | None) -> dict:
        """The state for the start of the epoch after ``finished``."""
        streams = None
        if self.planner.iterable:
            streams = Streams(max(1, self.config.num_workers)).save(self.config.num_workers, [])
        return dict(self.planner.state_of_next(finished), delivered=0, streams=streams)

    def load(self, state: dict) -> None:
        """Make the next ``begin_epoch`` continue the saved epoch after its delivered batches."""
        self.planner.restore(state)
        self._resume = state

    def _skip_delivered(self, plan: EpochPlan, state: dict) -> None:
        """Start the resumed ``plan`` after the batches delivered before the save."""
        delivered, sampler = state["delivered"], state["sampler"]
        if not self.config.in_order:  # a later save lists them too
            self._delivered = set(range(delivered)) if isinstance(delivered, int) else set(delivered)
        if self.planner.iterable:
            # Each worker's stream resumes by itself (_begin_streams); batch numbers, which
            # seed the batches, go on from the saved ones.
            plan.next_batch_no = delivered if isinstance(delivered, int) else max(delivered, default=-1) + 1
            self._deliver_no = plan.next_batch_no
        elif sampler is not None and not sampler["ended"]:
            # The sampler continues after batch upto-1 by itself (Planner.restore): pull nothing,
            # number the batches as the uninterrupted run did.
            upto = sampler["upto"]
            plan.next_batch_no = upto
            plan.sampler_states[upto - 1] = sampler["state"]  # saving again at once gives it back
            if isinstance(delivered, int):
                self._deliver_no = delivered
            else:
                plan.skip = frozenset(b for b in delivered if b >= upto)
        elif isinstance(delivered, int):  # in order: the first `delivered` batches, by index only
            for _ in range(delivered):
                if self.planner.pull(plan) is None:
                    break
            self._deliver_no = delivered
        else:
            plan.skip = frozenset(delivered)

    def _begin_streams(self, plan: EpochPlan, saved: dict | None) -> None:
        """Iterable datasets: round-robin over the workers' streams; after a resume,
        each stream starts where the saved run left it (``Resume``), workers whose
        stream had ended sit out, and the round-robin goes on after the last worker."""
        n = self.config.num_workers
        self._streams = Streams(max(1, n)) if saved is None else Streams.restore(saved)
        self._made_by = {}
        ended = set(saved["exhausted"]) if saved is not None else set()
        start = 0 if saved is None or saved["last"] is None else (saved["last"] + 1) % max(1, n)
        self._active = set(range(n)) - ended
        self._rr = itertools.cycle([*range(start, n), *range(start)])
        if saved is None:
            return
        if self._inline is not None and ended:  # in-process: the one stream had ended
            plan.batches = iter(())
            return
        # Thread workers share one dataset object: they replay their batches instead.
        own_dataset = (self.pool is None or self.pool.passes_attrs) and _resume.stateful(self.spec.dataset)
        for w, (state, count) in enumerate(saved["workers"]):
            if w in ended:
                continue
            if state is not None and own_dataset:
                msg = Resume(plan.number, state)
            else:
                msg = Resume(plan.number, None, count * self.planner.samples_per_batch())
            if self._inline is not None:
                self._inline.resume(msg)
                continue
            if self.pool.passes_attrs:  # attributes first: they must not overwrite the loaded state
                self._sync_dataset(w, plan)
            self.pool.submit(w, msg)

    # -- supervision ---------------------------------------------------------------
    def _check_shm(self, batch) -> None:
        """After the first batch: would the batches in flight fit in /dev/shm?"""
        self._shm_checked = True
        per_batch = _transport.shared_bytes(batch)
        free = _limits.shm_free_bytes()
        if not per_batch or free is None:
            return
        need = per_batch * (self.config.window + 2)  # in flight, plus the loop's and the next
        if need > free:
            self._go_pipe_only(f"/dev/shm has {free / 2**20:,.1f} MB free, and the {self.config.window} "
                               f"batches in flight need about {need / 2**20:,.1f} MB "
                               f"({per_batch / 2**20:,.1f} MB each)")

    @staticmethod
    def _shm_text() -> str:
        free, size = _limits.shm_free_bytes() or 0, _limits.shm_size_bytes() or 0
        return f"{free / 2**20:,.1f} MB free of {size / 2**20:,.0f} MB"

    def _go_pipe_only(self, why: str) -> None:
        """Send whole batches through the pipes from now on: slower for large batches,
        but a full /dev/shm can no longer kill workers with SIGBUS."""
        if self._pipe_only:
            return
        self._pipe_only = why
        warnings.warn(
            f"{why}. nostall now copies batches through its pipes instead of shared memory (slower "
            "for large batches, no crash). To use shared memory again, give /dev/shm more room "
            "(e.g. `docker run --shm-size=2g`) or lower batch_size or prefetch_factor.",
            RuntimeWarning,
            stacklevel=3,
        )
        for w in list(self._sched.load):
            self.pool.submit(w, PipeOnly(why))

    def _replace(self, worker_id: int, exit: WorkerExit) -> None:
        """A worker process is gone: start another in its place and send its batches
        again (per-batch seeding makes them identical), or give up and raise."""
        held = sorted((tid, t) for tid, t in self._inflight.items() if t.worker_id == worker_id)
        cause = self.supervisor.death_cause(worker_id, exit)
        _diagnose.forget_stack_file(exit.pid)
        shm_full = exit.exitcode == -signal.SIGBUS and not self._pipe_only and self.pool.passes_attrs
        if shm_full:  # the classic "Bus error": a shared tensor outgrew /dev/shm
            cause += f". Likely cause: /dev/shm is full ({self._shm_text()})"
            self._go_pipe_only(f"worker {worker_id} died of SIGBUS writing a batch to /dev/shm "
                               f"({self._shm_text()})")
        # Deaths from a full /dev/shm before the switch took effect are not the workers' fault.
        excused = bool(self._pipe_only) and exit.exitcode == -signal.SIGBUS
        if not self.supervisor.may_restart(cause, excused) or self.planner.iterable:
            self.close()
            raise RuntimeError(self.supervisor.gave_up(
                cause, [t.indices for _, t in held if t.wanted], self.planner.iterable))
        self.pool.restart(worker_id)
        if self._pipe_only:
            self.pool.submit(worker_id, PipeOnly(self._pipe_only))
        self._sched.reset(worker_id)
        self._last_done.pop(worker_id, None)
        self._worker_dstate[worker_id] = self._start_dstate
        again = 0
        for tid, task in held:
            del self._inflight[tid]
            if task.wanted:
                self._submit(self._sched.pick(time.monotonic()), task.plan, task.batch_no, task.indices)
                again += 1
        warnings.warn(
            f"{cause}. nostall started a new worker in its place (restart {len(self.supervisor.restarts)} of "
            f"at most {self.config.max_restarts}) and sent its {again} unfinished batch(es) again; the "
            "epoch goes on with the same batches.",
            RuntimeWarning,
            stacklevel=2,
        )

    def _check_hangs(self) -> None:
        """Report a batch that has run far longer than its peers, with its worker's
        stack; then restart that worker or raise (``on_hang``)."""
        if not self._inflight:
            return
        now = time.monotonic()
        threshold, how = self.supervisor.hang_threshold(self._sched.costs())
        oldest: dict[int, tuple] = {}
        for tid, task in self._inflight.items():
            if task.wanted and (task.worker_id not in oldest or tid < oldest[task.worker_id][0]):
                oldest[task.worker_id] = (tid, task)
        for worker_id, (tid, task) in oldest.items():
            started = max(task.submitted, self._last_done.get(worker_id, 0.0))
            if now - started <= threshold or tid in self.supervisor.reported:
                continue
            self.supervisor.reported.add(tid)
            self._hung(worker_id, task, now - started, how)

    def _hung(self, worker_id: int, task: _InFlight, elapsed: float, how: str) -> None:
        pid = self.pool.pids.get(worker_id)
        who = f"nostall worker {worker_id}" + (f" (pid {pid})" if pid else " (a thread)")
        what = f"batch {task.batch_no} of epoch {task.plan.number}"
        if not self.planner.iterable:
            what += f", sample indices {task.indices}"
        message = self.supervisor.hang_message(who, what, elapsed, how, self.pool.stack(worker_id))
        if self.config.on_hang == "raise" or not self.pool.can_restart:
            self.close()
            fix = ("Find why that sample never finishes (the stack above shows where it is); "
                   "raise hang_timeout if such batches are legitimately slow")
            if self.config.on_hang == "restart":
                fix += "; thread workers cannot be stopped, use worker_type='process' to restart them"
            raise RuntimeError(f"{message}\nThe loader was closed. {fix}.")
        warnings.warn(f"{message}\nnostall stops that worker and makes its batches again in a new one "
                      "(on_hang='restart').", RuntimeWarning, stacklevel=3)
        self.supervisor.hung[worker_id] = f"{who} hung on {what} for {elapsed:.1f} s and was stopped"
        self.pool.kill(worker_id)

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
