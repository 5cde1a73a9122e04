"""An in-memory ``WorkerPool`` for engine tests (a test helper, not part of nostall).

Every worker is a real ``BatchMaker`` started by the real ``_worker._start`` (thread
mode: nothing global is seeded or published) and run by the real ``_worker.serve``
loop, synchronously, in the calling thread: ``submit`` queues a message in the worker's
inbox, ``poll`` has each worker in turn handle its whole inbox and returns what the
workers sent, in order. No process, no thread, no pipe: what is left is the engine.

A test can make a worker die (``die_on_task``, or ``kill`` at any moment: its inbox is
lost and ``poll`` reports ``WorkerDied``), fail to start (``fail_start``), or send any
message (``report``). ``made`` lists the tasks workers took, in order.

``use_inmemory_pool(loader)`` makes a nostall loader's engine use such pools.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import signal
import traceback

from nostall.workers import _pool, _worker
from nostall.workers._protocol import Started, Stop, Task, WorkerDied, WorkerExit


class _Worker:
    def __init__(self, maker, info):
        self.maker = maker
        self.info = info  # its torch WorkerInfo, published while it runs
        self.inbox: collections.deque = collections.deque()
        self.tasks = 0  # tasks taken since it started
        self.exit: WorkerExit | None = None  # set when it died, until poll reports it


class InMemoryPool:
    """Implements ``nostall.workers._protocol.WorkerPool`` with workers run in the calling thread
    (see the module docstring).

    ``die_on_task``: ``{worker_id: n}``: that worker dies (``exitcode``, SIGKILL by default)
    when it takes its n-th task, counted from its start; once (its replacement lives).
    ``fail_start``: ``{worker_id: exception}``: starting that worker raises the exception
    (as a raising worker_init_fn would), on every start."""

    uses_shm = False
    can_restart = True
    blocked = 0.0
    poll_progressed = False

    def __init__(self, spec, num_workers: int, base_seed: int, start: int | None = None, *,
                 die_on_task: dict | None = None, fail_start: dict | None = None,
                 exitcode: int = -signal.SIGKILL):
        _worker.install_thread_worker_info()
        self.passes_attrs = spec.iterable  # each worker of an iterable dataset holds its own copy, as threads
        self.num_workers = num_workers
        self._spec, self._base_seed = spec, base_seed
        self._die_on_task = dict(die_on_task or {})
        self._fail_start = dict(fail_start or {})
        self._exitcode = exitcode
        self._workers: dict[int, _Worker] = {}
        self._outbox: list = []  # (worker_id, message) sent, until polled
        self.pids: dict = {}  # no processes
        self.exits: dict = {}
        self.owner_pid = os.getpid()
        self.made: list = []  # (worker_id, epoch, batch_no) of every task a worker took
        self.starts: collections.Counter = collections.Counter()  # worker id -> times started
        self.closed = False
        for worker_id in range(num_workers if start is None else start):
            self.add(worker_id)

    @property
    def foreign(self) -> bool:
        """True in a forked child of the process that made the pool."""
        return os.getpid() != self.owner_pid

    # -- WorkerPool ---------------------------------------------------------------
    def add(self, worker_id: int) -> None:
        """Start worker ``worker_id``: ``Started`` or ``StartFailed`` comes with the next poll."""
        spec = _pool.thread_spec(self._spec, worker_id)
        if worker_id in self._fail_start:
            spec = dataclasses.replace(spec, worker_init_fn=_Raise(self._fail_start[worker_id]))
        self.starts[worker_id] += 1
        try:
            maker, failure = _worker._start(spec, worker_id, self.num_workers, self._base_seed, "thread")
            info = _worker._thread_info.info
        finally:
            _worker._thread_info.info = None  # the calling thread is the loader's, not a worker
        if failure is not None:
            self._outbox.append((worker_id, failure))
            return
        self._workers[worker_id] = _Worker(maker, info)
        self._outbox.append((worker_id, Started()))

    def restart(self, worker_id: int) -> None:
        """Start a new worker in place of one reported dead."""
        self._workers.pop(worker_id, None)
        self.add(worker_id)

    def submit(self, worker_id: int, msg) -> None:
        """Queue ``msg`` for the worker; a dead or unknown worker drops it, as a closed pipe would."""
        worker = self._workers.get(worker_id)
        if worker is not None and worker.exit is None:
            worker.inbox.append(msg)

    def poll(self, timeout: float | None) -> list:
        """Have every worker handle its inbox now; return every ``(worker_id, message)`` sent.
        Raises if nothing at all was sent: the engine waits for a task no worker holds."""
        for worker_id in sorted(self._workers):
            worker = self._workers[worker_id]
            if worker.inbox and worker.exit is None:
                self._serve(worker_id, worker)
            if worker.exit is not None:
                del self._workers[worker_id]
                self.exits[worker_id] = worker.exit
                self._outbox.append((worker_id, WorkerDied(worker_id, worker.exit)))
        out, self._outbox = self._outbox, []
        if not out:
            raise AssertionError("the engine polls, but no in-memory worker holds any message: a task was lost")
        return out

    def kill(self, worker_id: int) -> None:
        """The worker dies now, losing its inbox; the next poll reports it."""
        worker = self._workers.get(worker_id)
        if worker is not None and worker.exit is None:
            worker.inbox.clear()
            worker.exit = WorkerExit(worker_id, None, self._exitcode)

    def stack(self, worker_id: int) -> str | None:
        """Workers run in the calling thread: its stack."""
        return "".join(traceback.format_stack())

    def wait_started(self, timeout: float = 30.0) -> dict:
        """No processes, no pids."""
        return {}

    def close(self) -> None:
        """Drop every worker and message."""
        self.closed = True
        self._workers.clear()
        self._outbox = []

    # -- for tests ---------------------------------------------------------------------
    def report(self, worker_id: int, msg) -> None:
        """Deliver ``msg`` as if worker ``worker_id`` had sent it, with the next poll."""
        self._outbox.append((worker_id, msg))

    def makers(self) -> dict:
        """The running workers' BatchMakers, by worker id."""
        return {w: worker.maker for w, worker in self._workers.items()}

    def _serve(self, worker_id: int, worker: _Worker) -> None:
        def receive():
            if not worker.inbox:
                return Stop()  # handled everything queued: serve returns, to be called again next poll
            msg = worker.inbox.popleft()
            if isinstance(msg, Task):
                worker.tasks += 1
                if self._die_on_task.get(worker_id) == worker.tasks:
                    del self._die_on_task[worker_id]
                    self.kill(worker_id)
                    return Stop()
                self.made.append((worker_id, msg.epoch, msg.batch_no))
            return msg

        def send(msg) -> bool:
            self._outbox.append((worker_id, msg))
            return True

        _worker._thread_info.info = worker.info  # get_worker_info() inside the dataset, as in a thread worker
        try:
            _worker.serve(worker.maker, receive, send)
        finally:
            _worker._thread_info.info = None


class _Raise:
    """A worker_init_fn that raises ``exc`` (``fail_start``)."""

    def __init__(self, exc: BaseException):
        self.exc = exc

    def __call__(self, worker_id: int) -> None:
        raise self.exc


def use_inmemory_pool(loader, **options) -> list:
    """Make ``loader`` (a nostall DataLoader not iterated yet) run its workers in
    :class:`InMemoryPool` s built with ``options``; returns the list of the pools it
    makes, filled as it makes them."""
    engine = loader._engine = loader._start_engine()
    pools: list = []

    def make(kind, spec, num_workers, base_seed, start):
        pool = InMemoryPool(spec, num_workers, base_seed, start, **options)
        pools.append(pool)
        return pool

    engine._make_pool = make
    return pools
