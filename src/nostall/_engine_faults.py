"""The engine's part in supervision: dead and hung workers, and a /dev/shm too small.

``Supervisor`` (``_supervise``) holds the policy and the messages; this mixin acts
on the pool: replaces a dead worker and sends its batches again, reports and
stops a hung one, and moves batches to the pipes when /dev/shm cannot hold them.
It works on ``Engine``'s state (pool, in-flight tasks, scheduler).
"""

from __future__ import annotations

import signal
import time
import warnings
from typing import TYPE_CHECKING

from . import _limits, _supervise, _transport
from ._pool import WorkerExit
from ._worker import PipeOnly

if TYPE_CHECKING:
    from ._engine import _InFlight


class FaultHandling:
    """Supervision methods of ``Engine`` (see the module docstring)."""

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
        again (per-batch seeding makes them identical), or give up and raise: when the
        batch it was making had already ended a worker (a poison batch), when too many
        workers died, or for an iterable dataset (its stream cannot move to a new worker)."""
        held = sorted((tid, t) for tid, t in self._inflight.items() if t.worker_id == worker_id)
        started = worker_id in self._started  # it had said "ready": it died making a batch
        self._started.discard(worker_id)
        # A worker makes its tasks in the order sent: the oldest one held is the one it was making.
        making = held[0][1] if held and started and held[0][1].wanted else None
        what = self._describe_task(making) if making is not None else None
        hung = self.supervisor.hung.get(worker_id)
        head = "" if hung else _supervise.torch_death_text(exit)
        doing = (" while starting, before its first batch (in worker_init_fn or earlier)" if not started
                 else f" while making {what}" if what else "")
        short = hung or exit.describe()
        cause = self.supervisor.death_cause(worker_id, exit, doing)
        shm_full = exit.exitcode == -signal.SIGBUS and not self._pipe_only and self.pool.passes_attrs
        if shm_full:  # the classic "Bus error": a shared tensor outgrew /dev/shm
            cause += f". Likely cause: /dev/shm is full ({self._shm_text()})"
            self._go_pipe_only(f"worker {worker_id} died of SIGBUS writing a batch to /dev/shm "
                               f"({self._shm_text()})")
        if what is not None and exit.factory is None:  # a worker lost with its factory is no batch's fault
            earlier = self.supervisor.strike((making.plan.serial, making.batch_no), short)
            if len(earlier) + 1 >= _supervise.POISON_STRIKES:
                self.close()
                raise RuntimeError(self.supervisor.poisoned(head, cause, earlier))
        # Deaths from a full /dev/shm before the switch took effect are not the workers' fault.
        excused = bool(self._pipe_only) and exit.exitcode == -signal.SIGBUS
        if exit.factory is not None:
            allowed = self.supervisor.lost_with_factory(exit.factory, cause, self.worker_log.deliveries)
        else:
            allowed = self.supervisor.may_restart(cause, excused, self.worker_log.deliveries)
        if not allowed or self.planner.iterable:
            self.close()
            raise RuntimeError(self.supervisor.gave_up(
                head, cause, [t.indices for _, t in held if t.wanted and started], self.planner.iterable))
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
        sup = self.supervisor
        warnings.warn(
            f"{cause.rstrip('.')}. nostall started a new worker in its place"
            f"{' (and a new worker factory)' if exit.factory is not None else ''} (restart {sup.restart_count}; "
            f"{sup.in_a_row} failure(s) in a row with no batch delivered, at most max_worker_restarts="
            f"{self.config.max_restarts}) and sent its {again} unfinished batch(es) again; the epoch goes on with the "
            "same batches." + (" If that batch ends a worker again, the loader stops and names it." if what else ""),
            RuntimeWarning,
            stacklevel=2,
        )

    def _describe_task(self, task: _InFlight) -> str:
        """``"batch 5 of epoch 0 (sample indices [20, 21, 22, 23])"`` (no indices for an iterable dataset)."""
        what = f"batch {task.batch_no} of epoch {task.plan.number}"
        if not self.planner.iterable:
            what += f" (sample indices {task.indices})"
        return what

    def _waiting_on(self) -> str:
        """For a timeout: ``", waiting for batch 3 of epoch 0 (sample indices [..]) from worker 0 (pid 12)"``."""
        plan = self._current
        mine = [t for t in self._inflight.values() if t.plan is plan and t.wanted]
        if not mine:
            return ""
        if self.config.in_order:
            mine = [t for t in mine if t.batch_no == self._deliver_no] or mine
        task = min(mine, key=lambda t: t.batch_no)
        what = self._describe_task(task)
        pid = self.pool.pids.get(task.worker_id)
        return f", waiting for {what} from worker {task.worker_id}" + (f" (pid {pid})" if pid else "")

    def _check_hangs(self) -> None:
        """Report a batch that has run far longer than its peers, with its worker's
        stack; then restart that worker or raise (``on_hang``)."""
        if not self._inflight:
            return
        if self.supervisor.reported:  # only tasks still in flight can be reported again
            self.supervisor.reported.intersection_update(self._inflight)
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
