"""Supervision bookkeeping: worker restarts, hung batches, skipped samples.

The engine does the mechanics (replace a worker, send its batches again); this
module decides and words it: how many restarts are left, when a batch counts as
hung, whether too many samples were skipped, and the messages that say what
happened, where (worker, pid, sample indices) and what to do.
"""

from __future__ import annotations

import math
import signal
import statistics
import time
import warnings
from collections import deque
from dataclasses import dataclass, field

from ..observe import _diagnose
from .._config import PoolConfig
from ..observe._stats import batch_len

AUTO_HANG_FLOOR_S = 30.0  # an automatic threshold never goes below this
AUTO_HANG_FACTOR = 20.0  # ... and is this many median batches
AUTO_HANG_UNKNOWN_S = 120.0  # before any batch finished (first batches may open files, warm caches)


STREAM_BASE = 1000  # an epoch of unknown length: skipped samples are counted against at least this many
SKIPPED_KEPT = 10_000  # the most recent skipped samples kept for loader.stats.skipped
RESTARTS_KEPT = 1_000  # the most recent restarts kept for loader.stats.restarts
STRIKES_KEPT = 1_000  # batches whose worker died, remembered to recognise a poison batch

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
    restarts: deque = field(default_factory=lambda: deque(maxlen=RESTARTS_KEPT))  # one line per restart, latest
    restart_count: int = 0  # every restart (``restarts`` keeps the latest)
    oom_baseline: int | None = None
    hung: dict = field(default_factory=dict)  # worker id -> message, for workers nostall killed
    reported: set = field(default_factory=set)  # task ids already reported as hung
    skipped: deque = field(default_factory=lambda: deque(maxlen=SKIPPED_KEPT))  # (epoch, batch, index, error), latest
    skipped_total: int = 0  # every skipped sample (``skipped`` keeps the latest)
    _skip_serial: int = -1  # the plan whose skipped samples are counted below
    _epoch_skipped: list = field(default_factory=list)  # its skipped sample indices (at most the limit + a batch)
    _epoch_read: int = 0  # its samples read so far (counted only when its length is unknown)
    _first_error: tuple | None = None  # its first failure: (batch, index, error)
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
        self.restart_count += 1
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
        a ``_protocol.FactoryExit``). The factory's death is one failure, however many workers
        it took along: counted, and decided, once, with the first of them."""
        if factory not in self.factories:
            self.factories[factory] = self.may_restart(factory.describe(), delivered=delivered)
        self.restarts.append(cause)
        return self.factories[factory]

    def strike(self, key: tuple, cause: str) -> list:
        """Record that a worker died (or hung) while making batch ``key``; return the
        causes of that batch's earlier deaths."""
        if key not in self.strikes and len(self.strikes) >= STRIKES_KEPT:
            del self.strikes[next(iter(self.strikes))]  # the oldest: a poison batch strikes again soon
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
    def count_skipped(self, plan, batch_no: int, result, epoch_samples: int | None) -> None:
        """A batch reaches the loop (counted in delivery order, so every batch before the
        one that goes over the limit is delivered first): add its skipped samples and
        raise :class:`SkippedTooMany` when the epoch's count is over the limit.

        The limit: skipping goes on while skipped <= ``max_skipped_fraction`` x the
        epoch's samples (64 samples at 0.01 allow none). An epoch of unknown length (a
        batch sampler without ``len``) counts the samples read so far instead, at least
        ``STREAM_BASE`` of them (so a job is not stopped by its first few failures), and
        the exact total at its end (:meth:`epoch_ended`)."""
        if plan.serial != self._skip_serial:
            self._skip_serial, self._epoch_skipped, self._epoch_read, self._first_error = plan.serial, [], 0, None
        skipped = result.skipped
        if epoch_samples is None:  # only then is the number of samples read needed
            self._epoch_read += len(skipped) + (batch_len(result.payload) if result.kind == "ok" else 0)
        if not skipped:
            return
        if self._first_error is None:
            self._first_error = (batch_no, *skipped[0])
        self.skipped_total += len(skipped)
        for index, error in skipped:
            self.skipped.append((plan.number, batch_no, index, error))
            self._epoch_skipped.append(index)
        base = epoch_samples if epoch_samples is not None else max(self._epoch_read, STREAM_BASE)
        self._check_skipped(plan, batch_no, base, epoch_samples is not None)

    def epoch_ended(self, plan) -> None:
        """The end of an epoch of unknown length: check its count against its total."""
        if plan.serial == self._skip_serial and self._epoch_skipped:
            self._check_skipped(plan, None, self._epoch_read, True, ended=True)

    def _check_skipped(self, plan, batch_no, base: int, known: bool, ended: bool = False) -> None:
        count, fraction = len(self._epoch_skipped), self.config.max_skipped_fraction
        allowed = allowed_skips(fraction, base)
        if count <= allowed:
            return
        shown = self._epoch_skipped[:20]
        more = f" and {count - len(shown)} more" if count > len(shown) else ""
        where, index, error = self._first_error
        if known and not ended:
            limit = f"max_skipped_fraction={fraction:g} allows {allowed} of this epoch's {base} samples"
        elif ended:
            limit = (f"max_skipped_fraction={fraction:g} allows {allowed} of the {base} samples this epoch "
                     "held (its length was not known in advance)")
        else:
            limit = (f"max_skipped_fraction={fraction:g} allows {allowed} of the {self._epoch_read} samples read so "
                     f"far (the epoch's length is unknown: the fraction applies to the samples read so far, "
                     f"counted as at least {STREAM_BASE:,})")
        if ended:
            delivered = "Every batch of the epoch was delivered, without its failing samples."
        elif self.config.in_order:
            delivered = (f"Every batch before batch {batch_no} was delivered, without its failing samples; "
                         f"batch {batch_no} and the rest of the epoch were not.")
        else:
            delivered = (f"The batches that arrived before batch {batch_no} were delivered (in_order=False), "
                         f"without their failing samples; batch {batch_no} and the rest were not.")
        need = count / base if base else 1.0
        these = "this one" if count == 1 else f"these {count}"
        raise SkippedTooMany(
            f"epoch {plan.number}: {count} sample{'s' if count != 1 else ''} failed and "
            f"{'were' if count != 1 else 'was'} skipped; {limit} (skipping goes on while skipped <= fraction x "
            f"samples). Skipped sample indices: {shown}{more}. First error, sample index {index} (batch {where}): "
            f"{error}. {delivered} Fix those samples (loader.stats.skipped lists them) or raise "
            f"max_skipped_fraction ({need:.3g} or more allows {these})."
        )


def allowed_skips(fraction: float, samples: int) -> int:
    """Samples an epoch of ``samples`` may skip: floor(fraction x samples), with a little
    room for binary fractions (0.29 x 100 is 28.999999999999996 in floating point)."""
    return math.floor(fraction * samples + 1e-9)


class Supervision:
    """The engine's hands for ``Supervisor``'s policy: replaces a dead worker and sends
    its batches again, reports and stops a hung one. Owns which workers finished
    starting and when each last finished a batch; works on the engine's pool,
    in-flight tasks and scheduler (``engine``, which holds this object)."""

    def __init__(self, engine, supervisor: Supervisor):
        self.engine = engine
        self.supervisor = supervisor
        self.started: set = set()  # workers that sent Started
        self.ready_at: dict[int, float] = {}  # worker -> when it sent Started
        self.last_done: dict[int, float] = {}  # worker -> when it last finished a batch

    def pool_started(self) -> None:
        """A new pool: no worker has started or finished anything yet."""
        self.last_done = {}
        self.started = set()
        self.ready_at = {}
        self.supervisor.pool_started()

    def ready(self, worker_id: int) -> None:
        """Worker ``worker_id`` has started (worker_init_fn returned): its batches' time runs from now."""
        self.started.add(worker_id)
        self.ready_at[worker_id] = time.monotonic()

    def replace(self, worker_id: int, exit) -> None:
        """A worker is gone (``exit``: the ``WorkerExit`` of its ``WorkerDied``): start another in its
        place and send its batches again (per-batch seeding makes them identical), or
        give up and raise: when the batch it was making had already ended a worker (a
        poison batch), when too many workers died, or for an iterable dataset (its
        stream cannot move to a new worker)."""
        e, sup = self.engine, self.supervisor
        held = sorted((tid, t) for tid, t in e._inflight.items() if t.worker_id == worker_id)
        started = worker_id in self.started  # it had sent Started: it died making a batch
        self.started.discard(worker_id)
        self.ready_at.pop(worker_id, None)
        # A worker makes its tasks in the order sent: the oldest one held is the one it was making.
        making = held[0][1] if held and started and held[0][1].wanted else None
        what = self.describe(making) if making is not None else None
        hung = sup.hung.get(worker_id)
        head = "" if hung else torch_death_text(exit)
        doing = (" while starting, before its first batch (in worker_init_fn or earlier)" if not started
                 else f" while making {what}" if what else "")
        short = hung or exit.describe()
        cause = sup.death_cause(worker_id, exit, doing)
        transport = e.transport
        shm_full = exit.exitcode == -signal.SIGBUS and not transport.pipe_only and e.pool.uses_shm
        if shm_full:  # the classic "Bus error": a shared tensor outgrew /dev/shm
            cause += f". Likely cause: /dev/shm is full ({transport.shm_text()})"
            transport.go_pipe_only(f"worker {worker_id} died of SIGBUS writing a batch to /dev/shm "
                                   f"({transport.shm_text()})", e.pool, e._sched.load)
        if what is not None and exit.factory is None:  # a worker lost with its factory is no batch's fault
            earlier = sup.strike((making.plan.serial, making.batch_no), short)
            if len(earlier) + 1 >= POISON_STRIKES:
                e.close()
                raise RuntimeError(sup.poisoned(head, cause, earlier))
        # Deaths from a full /dev/shm before the switch took effect are not the workers' fault.
        excused = bool(transport.pipe_only) and exit.exitcode == -signal.SIGBUS
        if exit.factory is not None:
            allowed = sup.lost_with_factory(exit.factory, cause, e.worker_log.deliveries)
        else:
            allowed = sup.may_restart(cause, excused, e.worker_log.deliveries)
        iterable = e.planner.iterable
        if not allowed or iterable:
            e.close()
            raise RuntimeError(sup.gave_up(head, cause, [t.indices for _, t in held if t.wanted and started], iterable))
        e.pool.restart(worker_id)
        transport.tell(e.pool, worker_id)
        e._sched.reset(worker_id)
        self.last_done.pop(worker_id, None)
        e._worker_dstate[worker_id] = e._start_dstate
        again = 0
        for tid, task in held:
            del e._inflight[tid]
            if task.wanted:
                e._submit(e._sched.pick(time.monotonic()), task.plan, task.batch_no, task.indices)
                again += 1
        warnings.warn(
            f"{cause.rstrip('.')}. nostall started a new worker in its place"
            f"{' (and a new worker factory)' if exit.factory is not None else ''} (restart {sup.restart_count}; "
            f"{sup.in_a_row} failure(s) in a row with no batch delivered, at most max_worker_restarts="
            f"{e.config.max_restarts}) and sent its {again} unfinished batch(es) again; the epoch goes on with the "
            "same batches." + (" If that batch ends a worker again, the loader stops and names it." if what else ""),
            RuntimeWarning,
            stacklevel=2,
        )

    def describe(self, task) -> str:
        """``"batch 5 of epoch 0 (sample indices [20, 21, 22, 23])"`` (no indices for an iterable dataset)."""
        what = f"batch {task.batch_no} of epoch {task.plan.number}"
        if not self.engine.planner.iterable:
            what += f" (sample indices {task.indices})"
        return what

    def waiting_on(self, plan, next_in_order: int) -> str:
        """For a timeout: ``", waiting for batch 3 of epoch 0 (sample indices [..]) from worker 0 (pid 12)"``."""
        e = self.engine
        mine = [t for t in e._inflight.values() if t.plan is plan and t.wanted]
        if not mine:
            return ""
        if e.config.in_order:
            mine = [t for t in mine if t.batch_no == next_in_order] or mine
        task = min(mine, key=lambda t: t.batch_no)
        what = self.describe(task)
        pid = e.pool.pids.get(task.worker_id)
        return f", waiting for {what} from worker {task.worker_id}" + (f" (pid {pid})" if pid else "")

    def check_hangs(self) -> None:
        """Report a batch that has run far longer than its peers, with its worker's
        stack; then restart that worker or raise (``on_hang``)."""
        inflight = self.engine._inflight
        if not inflight:
            return
        sup = self.supervisor
        if sup.reported:  # only tasks still in flight can be reported again
            sup.reported.intersection_update(inflight)
        now = time.monotonic()
        threshold, how = sup.hang_threshold(self.engine._sched.costs())
        oldest: dict[int, tuple] = {}
        for tid, task in inflight.items():
            if task.wanted and (task.worker_id not in oldest or tid < oldest[task.worker_id][0]):
                oldest[task.worker_id] = (tid, task)
        slow_start = getattr(self.engine.pool, "starts_slowly", False)
        for worker_id, (tid, task) in oldest.items():
            ready = self.ready_at.get(worker_id)
            if ready is None and slow_start:
                continue  # a Ray actor still being placed or started: its pool bounds that wait itself
            started = max(task.submitted, self.last_done.get(worker_id, 0.0), ready or 0.0)
            if now - started <= threshold or tid in sup.reported:
                continue
            sup.reported.add(tid)
            self._hung(worker_id, task, now - started, how)

    def _hung(self, worker_id: int, task, elapsed: float, how: str) -> None:
        e = self.engine
        pid = e.pool.pids.get(worker_id)
        who = f"nostall worker {worker_id}" + (f" (pid {pid})" if pid else " (a thread)")
        what = f"batch {task.batch_no} of epoch {task.plan.number}"
        if not e.planner.iterable:
            what += f", sample indices {task.indices}"
        message = self.supervisor.hang_message(who, what, elapsed, how, e.pool.stack(worker_id))
        if e.config.on_hang == "raise" or not e.pool.can_restart:
            e.close()
            fix = ("Find why that sample never finishes (the stack above shows where it is); "
                   "raise hang_timeout if such batches are legitimately slow")
            if e.config.on_hang == "restart":
                fix += "; thread workers cannot be stopped, use worker_type='process' to restart them"
            raise RuntimeError(f"{message}\nThe loader was closed. {fix}.")
        warnings.warn(f"{message}\nnostall stops that worker and makes its batches again in a new one "
                      "(on_hang='restart').", RuntimeWarning, stacklevel=3)
        self.supervisor.hung[worker_id] = f"{who} hung on {what} for {elapsed:.1f} s and was stopped"
        e.pool.kill(worker_id)
