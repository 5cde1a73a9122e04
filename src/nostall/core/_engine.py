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

import functools
import itertools
import os
import time
import warnings
import weakref
from dataclasses import dataclass

from torch.utils.data._utils.pin_memory import pin_memory as _pin

from ..workers import _datapipes, _limits, _seeding, _transport
from ..control._autotune import AutoTuner
from .._config import PoolConfig
from ..containers._large_containers import find_large_containers
from ._ledger import Ledger
from ._pinning import Pinner
from ._plan import EpochPlan, Planner, object_state
from ..workers._pool import ProcessPool, ThreadPool
from ..workers._protocol import (Pause, Result, SetAttrs, Started, StartFailed, Task, TransportFallback, WorkerDied,
                        WorkerPool)
from ._schedule import Scheduler
from ..observe._stats import WorkerLog
from ..control._supervise import Supervision, Supervisor
from ..workers._transport_policy import TransportPolicy
from ..control._tuning import TuningDriver
from ..workers._worker import BatchMaker, WorkSpec

_COPY_ON_READ_WARN_BYTES = 32 * 2**20  # below this, copies per worker are not worth a warning
_warned_copy_on_read = False


def _warn_reseeded(worker_id: int, reseeded: frozenset) -> None:
    names = {"torch": "torch's (torch.manual_seed)", "numpy": "numpy's (np.random.seed)",
             "random": "Python's (random.seed)"}
    which = ", ".join(names[n] for n in sorted(reseeded))
    warnings.warn(
        f"nostall: worker_init_fn seeded the global random generator(s) {which} in worker {worker_id} "
        "(and maybe others). Your seed wins: nostall no longer seeds those per batch in workers whose "
        "worker_init_fn seeded them, so random draws from them in your dataset depend on which worker "
        "makes a batch and on num_workers, as in torch's DataLoader. Without the seeding in "
        "worker_init_fn, nostall seeds every batch from (seed, epoch, batch number) and batches do not "
        "depend on the workers.",
        stacklevel=4,
    )


def _warn_copy_on_read(dataset, num_workers: int) -> None:
    """Once per process: point a dataset holding large Python containers to nostall.flat.
    Costs a few milliseconds (200 elements of each large container are sized), paid
    after the first batches were handed to the workers."""
    global _warned_copy_on_read
    if _warned_copy_on_read:
        return
    large = [c for c in find_large_containers(dataset, sample=200) if c.nbytes >= _COPY_ON_READ_WARN_BYTES]
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
        stacklevel=4,  # the user's iter(loader)
    )


def make_pool(kind: str, spec: WorkSpec, num_workers: int, base_seed: int, start: int | None, ctx,
              ray_actor_options: dict | None = None) -> WorkerPool:
    """A pool of ``kind`` ("thread", "process" or "ray") workers, ``start`` of ``num_workers``
    started now (None: all). An engine's ``_make_pool`` is this with its ``ctx`` and Ray
    actor options (a test may put another pool there, see tests/inmemory_pool.py)."""
    if kind == "thread":
        return ThreadPool(spec, num_workers, base_seed, start)
    if kind == "ray":
        from ..workers._ray_pool import RayPool  # Ray is imported only by loaders that ask for it

        return RayPool(spec, num_workers, base_seed, start, ray_actor_options)
    return ProcessPool(ctx, spec, num_workers, base_seed, start)


_engines: weakref.WeakSet = weakref.WeakSet()  # this process's engines, for the fork hook


def _mark_forked() -> None:
    """In a forked child: an engine whose workers the parent started may not use them
    (see ``Engine.check_owner``); the flag keeps that check off the per-batch path."""
    for engine in list(_engines):
        if engine.pool is not None:
            engine.forked = True


os.register_at_fork(after_in_child=_mark_forked)


def forked_text(owner: int | None) -> str:
    """The error for a loader used in a forked child of the process that started its workers."""
    return (
        f"this nostall DataLoader's workers were started by process {owner}, and this is process "
        f"{os.getpid()}, a fork of it (os.fork(), or a multiprocessing child started with 'fork'). "
        "They belong to that process: taking batches here would take them from it. Create a new "
        "DataLoader in this process (after the fork; the dataset object can be passed to it), or "
        "fork before the loader's first iter(). Closing or dropping this copy is safe: it does not "
        "touch the parent's workers."
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
    """Runs epochs for one loader. Holds no reference to the loader object itself.

    It keeps the window (batches in flight and ready) and the hot path, and holds
    its parts: ``ledger`` (what was delivered; resume, ``_ledger``), ``tuning``
    (auto-tuning, ``_tuning``), ``supervision`` (dead and hung workers,
    ``_supervise``) and ``transport`` (/dev/shm or pipes, ``_transport_policy``)."""

    def __init__(self, config: PoolConfig, planner: Planner, spec: WorkSpec, ctx, pin_device):
        self.config = config
        self.planner = planner
        self.spec = spec
        self._make_pool = functools.partial(  # (kind, spec, num_workers, seed, start)
            make_pool, ctx=ctx, ray_actor_options=config.ray_actor_options)
        # pin_memory=True: batches are pinned in a thread as they arrive, not in next()
        self._pinner = (Pinner(functools.partial(_pin, device=pin_device), on_accelerator=True)
                        if pin_device is not None else None)
        self.pool = None
        self._inline: BatchMaker | None = None
        self._task_ids = itertools.count()
        self._inflight: dict[int, _InFlight] = {}
        self._ready: dict[tuple, Result] = {}  # (plan serial, batch_no) -> result
        self._arrivals: list = []  # keys in arrival order, for in_order=False
        self._sched = Scheduler(0)
        self.worker_log: WorkerLog | None = None  # for loader.stats
        self.keep_spans = False  # keep each batch's span for the trace (set by a loader with stats on)
        self._worker_dstate: dict[int, dict] = {}
        self._start_dstate: dict | None = None  # the dataset's attributes when the pool started
        self._current: EpochPlan | None = None
        self._epoch_samples: int | None = None  # samples in the current epoch, if known
        self.supervisor = Supervisor(config)
        self.supervision = Supervision(self, self.supervisor)
        self.ledger = Ledger(config, planner, spec.dataset)
        self.tuning = TuningDriver(config)
        self.transport = TransportPolicy()
        # on_sample_error="skip": samples are counted against the limit as their batch is delivered
        # (an iterable dataset's stream cannot go on after its iterator raised: its errors raise).
        self._skipping = config.on_sample_error == "skip" and not planner.iterable
        self._batch_bytes = 0  # largest batch seen, in tensor bytes (for max_inflight_bytes)
        self._kind = config.worker_type if config.worker_type in ("thread", "ray") else "process"  # the pool's workers
        self._started_workers = 0
        self._reseed_warned = False  # worker_init_fn seeded a global RNG (warned once per loader)
        self._ramp: int | None = None  # batches in flight until the pool's first answer (see _start_pool)
        self.closed = False
        self.forked = False  # this process is a fork of the one that started the pool (see _mark_forked)
        _engines.add(self)

    @property
    def tuner(self) -> AutoTuner | None:
        """num_workers="auto" / prefetch_factor="auto" / worker_type="auto": the tuner, once a pool started."""
        return self.tuning.tuner

    # -- epochs -----------------------------------------------------------------
    def begin_epoch(self) -> EpochPlan:
        """Start a new epoch: abandon the unfinished one, reuse or discard work prepared ahead."""
        if self.closed:
            raise RuntimeError("this nostall DataLoader was closed; create a new one to load again")
        self.check_owner()
        if not self.config.persistent and self.pool is not None:
            self._close_pool()
        plan = self.planner.begin()
        for task in self._inflight.values():
            if task.plan is not plan:
                task.wanted = False  # an abandoned epoch or a discarded prediction
        self._keep_ready(plan.serial)
        self._current = plan
        resume = self.ledger.begin(plan)
        self._epoch_samples = self.planner.epoch_samples()
        if self.worker_log is None:
            self.worker_log = WorkerLog(self.config.num_workers, self.config.window, self.supervisor,
                                        spans=self.keep_spans)
        started = False
        if self.config.num_workers == 0:
            if self._inline is None:
                self._inline = BatchMaker(self.spec, self.planner.base_seed, None, seed_globals=True)
                if self.spec.shards is not None:
                    _datapipes.shard(self.spec.dataset, self.spec.shards, 0, None)
        elif self.pool is None:
            self._start_pool()
            started = True
        if self.planner.iterable:
            own_copies = self.pool is None or self.pool.passes_attrs
            self._send_resume(plan, self.ledger.begin_streams(
                plan, resume["streams"] if resume is not None else None, self._inline is not None, own_copies))
        if self.pool is not None:
            self._fill()  # the workers start on this epoch now, as torch's iter() does
        if started and self._kind == "process":
            _warn_copy_on_read(self.spec.dataset, self.config.num_workers)  # after: it takes a few ms
        return plan

    def _send_resume(self, plan: EpochPlan, messages: list) -> None:
        """Iterable datasets after a resume: tell each worker where its stream starts."""
        for w, msg in messages:
            if self._inline is not None:
                self._inline.resume(msg)
                continue
            if self.pool.passes_attrs and self.config.sync_dataset:  # attributes first: they must not overwrite the loaded state
                self._sync_dataset(w, plan)
            self.pool.submit(w, msg)

    def state_dict(self) -> dict:
        """Where the loop is (see ``Ledger.state_dict``)."""
        return self.ledger.state_dict(self._current, self._inline is not None)

    def load(self, state: dict) -> None:
        """Make the next ``begin_epoch`` continue the saved epoch after its delivered batches."""
        self.ledger.load(state)

    def _start_pool(self) -> None:
        n, seed = self.config.num_workers, self.planner.base_seed
        budget = None
        if self._kind == "ray" and self.config.auto_workers:  # the cluster's free room, not this machine's CPUs
            from ..workers._ray_pool import auto_room

            n, budget = auto_room(self.config.ray_actor_options, n)
        start = self.tuning.start(n, budget)
        if self.tuning.tuner is not None:
            self.worker_log.tuner = self.tuning.tuner
        if self._kind == "process":
            _limits.ensure_open_files(n, max(1, self.config.prefetch_factor))
        self.pool = self._make_pool(self._kind, self.spec, n, seed, start)
        if self.pool.uses_shm:
            for w in range(n):
                self.transport.tell(self.pool, w)
        self._started_workers = n if start is None else start
        self.worker_log.started_workers = self._started_workers
        self._sched = Scheduler(self._started_workers, getattr(self.pool, "cpus", None))
        # Until the first batch comes back, no more batches in flight than CPUs: workers
        # that all start together on fewer cores all finish late (8 on 2 cores: 4x one
        # batch). The rest start when it arrives; busy CPUs lose nothing meanwhile.
        cpus = max(1, int(self._sched.cpus))
        self._ramp = cpus if self._kind == "process" and self._started_workers > cpus else None
        self.tuning.pool_started()
        self.supervision.pool_started()
        self._start_dstate = object_state(self.spec.dataset)
        self._worker_dstate = {w: self._start_dstate for w in range(n)}

    # -- the hot path -------------------------------------------------------------
    def next_batch(self, plan: EpochPlan):
        """The next batch of ``plan``; raises StopIteration at the end of its epoch."""
        if self.forked:
            self.check_owner()
        if plan is not self._current:
            raise RuntimeError(
                "this iterator was superseded by a newer iter(loader); a nostall DataLoader "
                "runs one epoch at a time, so take batches from the newest iterator"
            )
        if self._inline is not None:
            return self._next_inline(plan)
        tuning = self.tuning
        called = time.monotonic() if tuning.tuner is not None else 0.0
        tuning.polled = 0.0  # seconds this call spent waiting for workers (for the tuner)
        plan.waiting_since = None  # torch's `timeout` counts from when this call starts waiting
        while True:
            result = self._take_ready(plan)
            if result is not None:
                self.worker_log.delivered(self._occupancy() + 1)  # the pool exists: results came from it
                if tuning.tuner is not None:
                    self._tune(called)
                self._fill()  # the slot it held goes to new work before the user's step
                return self._deliver(result)
            self._fill()
            if self._epoch_done(plan):
                if not self.config.persistent:
                    self._close_pool()
                self._end_epoch(plan)
                raise StopIteration
            arrived = self._poll(plan)
            for worker_id, result in arrived:
                self._receive(worker_id, result)
            self.supervision.check_hangs()

    def _end_epoch(self, plan: EpochPlan) -> None:
        self.ledger.epoch_over = True
        if self._skipping and self._epoch_samples is None:
            self.supervisor.epoch_ended(plan)

    def _poll(self, plan: EpochPlan) -> list:
        """Wait for results, waking at least once a second to look for hung batches;
        raise torch's timeout error when ``timeout`` seconds pass with nothing new."""
        timeout = self.config.timeout or None
        if plan.waiting_since is None:
            plan.waiting_since = time.monotonic()
        wait = 1.0 if timeout is None else min(1.0, max(0.0, plan.waiting_since + timeout - time.monotonic()))
        try:
            arrived = self.pool.poll(wait)
        except (OSError, RuntimeError) as exc:
            if not _limits.out_of_open_files(exc):
                raise
            self.close()
            raise RuntimeError(_limits.too_many_open_files_text(_transport.INLINE_BYTES)) from None
        now = time.monotonic()
        self.tuning.polled += self.pool.blocked
        if arrived or self.pool.poll_progressed:
            plan.waiting_since = now
        elif timeout is not None and now - plan.waiting_since >= timeout:
            waiting_on = self.supervision.waiting_on(plan, self.ledger.deliver_no)
            raise RuntimeError(  # torch's sentence first: code and alerts written for torch match
                f"DataLoader timed out after {self.config.timeout} seconds. nostall: no batch arrived "
                f"from its {len(self._sched.load)} workers for {now - plan.waiting_since:.1f} s "
                f"(`timeout={self.config.timeout}`){waiting_on}. A sample may be stuck in the "
                "dataset's __getitem__ or be slower than `timeout`: raise `timeout` or find the slow sample."
            )
        return arrived

    def _next_inline(self, plan: EpochPlan):
        while True:
            item = self.planner.pull(plan)
            if item is None:
                self._end_epoch(plan)
                raise StopIteration
            batch_no, indices = item
            if batch_no in plan.skip:
                continue
            with _seeding.saved_global_rng():
                result = self._inline.make(Task(-1, plan.number, batch_no, indices, plan.stream_seed))
            if result.kind == "stop":
                plan.exhausted = True
                raise StopIteration
            if self._skipping:
                self.supervisor.count_skipped(plan, batch_no, result, self._epoch_samples)
            if result.kind == "empty":
                continue
            if self.ledger.streams is not None:
                self.ledger.streams.delivered(0, result.state, result.ended)
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
                    self.ledger.took_out_of_order(plan, key)
                    result = self._ready.pop(key)
                    if self._skipping:  # counted as delivered: the batches before are out already
                        self.supervisor.count_skipped(plan, key[1], result, self._epoch_samples)
                    return result
            return None
        key = (plan.serial, self.ledger.next_in_order())
        result = self._ready.pop(key, None)
        if result is not None:
            self.ledger.took_in_order(plan, key)
            if self._skipping:  # counted in delivery order: the batches before are out already
                self.supervisor.count_skipped(plan, key[1], result, self._epoch_samples)
        return result

    def _deliver(self, result: Result):
        if result.kind == "error":
            result.payload.reraise()
        if self._pinner is not None:
            return self._pinner.take(result.task_id, result.payload)
        return result.payload

    def _epoch_done(self, plan: EpochPlan) -> bool:
        if self.planner.iterable and not self.ledger.active:
            plan.exhausted = True
        if not plan.exhausted:
            return False
        return not any(t.plan is plan and t.wanted for t in self._inflight.values()) and not any(
            k[0] == plan.serial for k in self._ready
        )

    def _occupancy(self) -> int:
        return len(self._inflight) + len(self._ready)

    def _fill(self) -> None:
        tuner = self.tuning.tuner
        if tuner is None:
            window = self.config.window_for(self._batch_bytes)
        else:
            window = self.config.window_for(self._batch_bytes, tuner.workers, tuner.prefetch)
        if self._ramp is not None:
            window = min(window, self._ramp)
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
            active = self.ledger.active
            if plan is not self._current or not active:
                return None
            for worker_id in self.ledger.rr:
                if worker_id in active:
                    return worker_id
        return self._sched.pick(time.monotonic())

    def _submit(self, worker_id: int, plan: EpochPlan, batch_no: int, indices) -> None:
        if self.pool.passes_attrs and self.config.sync_dataset:
            self._sync_dataset(worker_id, plan)
        task_id = next(self._task_ids)
        now = time.monotonic()
        self._inflight[task_id] = _InFlight(plan, batch_no, worker_id, indices, now)
        self._sched.submitted(worker_id, now)
        self.pool.submit(worker_id, Task(task_id, plan.number, batch_no, indices, plan.stream_seed))

    def _sync_dataset(self, worker_id: int, plan: EpochPlan) -> None:
        """Send the worker the dataset attributes it lacks for this plan (set_epoch & co;
        only with ``sync_dataset``: otherwise workers keep the dataset of the first epoch, as torch's)."""
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
        self.pool.submit(worker_id, SetAttrs(attrs))
        self._worker_dstate[worker_id] = target

    def _receive(self, worker_id: int, msg) -> None:
        """Act on one message from the pool (see ``_protocol``)."""
        if not isinstance(msg, Result):
            self._receive_event(worker_id, msg)
            return
        result = msg
        self._ramp = None
        task = self._inflight.pop(result.task_id)
        if result.reseeded and not self._reseed_warned:
            self._reseed_warned = True
            _warn_reseeded(worker_id, result.reseeded)
        self.supervision.last_done[worker_id] = result.done
        self.worker_log.made(worker_id, task.plan.number, task.batch_no, result.started, result.done)
        if self.tuning.tuner is not None and self._kind != "thread":  # threads count in process_time
            self.tuning.received(result)
        for worker, seconds in self._sched.answered(worker_id, result.started, result.done, result.cpu).items():
            self.pool.submit(worker, Pause(seconds))
        if not task.wanted:
            return
        if result.kind == "stop":
            self.ledger.stopped(worker_id, task.batch_no)
            return
        transport = self.transport
        if not transport.checked and result.kind == "ok" and self.pool.uses_shm:
            transport.check(result.payload, self.config.window, self.pool, self._sched.load)
        if self.config.max_inflight_bytes is not None and result.kind == "ok":
            self._batch_bytes = max(self._batch_bytes, _transport.tensor_bytes(result.payload))
        key = (task.plan.serial, task.batch_no)
        self._ready[key] = result
        if self._pinner is not None and result.kind == "ok":
            self._pinner.start(result.task_id, result.payload)
        self.ledger.made(key, worker_id, result)
        if not self.config.in_order:
            self._arrivals.append(key)

    def _receive_event(self, worker_id: int, msg) -> None:
        """A message other than a made batch: a worker started, could not start, fell back
        to pipes, or died."""
        if isinstance(msg, Started):
            self.supervision.ready(worker_id)
        elif isinstance(msg, WorkerDied):
            self.supervision.replace(msg.worker_id, msg.exit)
        elif isinstance(msg, TransportFallback):
            transport = self.transport
            transport.go_pipe_only(f"worker {worker_id} could not put a batch in /dev/shm "
                                   f"({msg.reason}; {transport.shm_text()})", self.pool, self._sched.load)
        elif isinstance(msg, StartFailed):
            self.close()  # failed while starting: nothing can run
            msg.error.reraise()
        else:
            self.close()
            raise TypeError(f"nostall's worker pool returned {msg!r} from worker {worker_id}, which is not a "
                            "message of nostall.workers._protocol (Result, Started, StartFailed, TransportFallback, "
                            "WorkerDied): the pool does not follow the worker protocol")

    # -- auto-tuning --------------------------------------------------------------
    def _tune(self, called: float) -> None:
        """Feed the tuner one delivery; apply what it decides."""
        decision = self.tuning.delivered(called, self._sched)
        if decision == "thread":
            self._switch_to_threads()
            self.tuning.switched()
        elif decision == "apply":
            self._apply_tuning()

    def _switch_to_threads(self) -> None:
        """worker_type="auto" chose threads: the process workers finish the batches they
        hold (delivered as usual), then thread workers take over. Threads share the
        user's dataset object, so an epoch prepared ahead from a predicted dataset
        state is made again when allowed."""
        while self._inflight:
            for worker_id, result in self._poll(self._current):
                self._receive(worker_id, result)
            self.supervision.check_hangs()
        self._close_pool()
        self._kind = "thread"
        self.planner.dataset_in_workers = False
        self.planner.discard_ahead()
        self._keep_ready(self._current.serial)
        self._start_pool()

    def _keep_ready(self, serial: int) -> None:
        """Drop the batches made for epochs other than ``serial`` (abandoned or mispredicted)."""
        self._ready = {k: r for k, r in self._ready.items() if k[0] == serial}
        self._arrivals = [k for k in self._arrivals if k in self._ready]
        if self._pinner is not None:
            self._pinner.keep_only(r.task_id for r in self._ready.values())

    def _apply_tuning(self) -> None:
        wanted = self.tuning.tuner.workers
        while self._started_workers < wanted:
            self.pool.add(self._started_workers)
            self._sched.add_worker(self._started_workers)
            self._started_workers += 1
        self.worker_log.started_workers = self._started_workers
        self._sched.active = set(range(wanted))

    # -- lifecycle ------------------------------------------------------------
    @property
    def foreign(self) -> bool:
        """True in a forked child of the process that started this engine's workers."""
        return self.forked or (self.pool is not None and self.pool.foreign)

    def check_owner(self) -> None:
        """Raise if this process did not start the workers (a forked child): using them
        here would steal the parent's batches. In-process loading (no pool) is not shared."""
        if self.foreign:
            raise RuntimeError(forked_text(getattr(self.pool, "owner_pid", None)))

    def worker_pids(self) -> list:
        """Pids of the live worker processes (empty for threads and in-process loading)."""
        if self.pool is None:
            return []
        self.check_owner()  # the pids come over the factory's pipe: the parent's to read
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
        if self._pinner is not None:
            self._pinner.close()
        self._arrivals.clear()
