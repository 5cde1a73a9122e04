"""The worker protocol: what the engine tells workers, what comes back, and what a pool does.

A pool (``WorkerPool``) runs workers and carries messages. The engine hands each
worker messages of the first group with ``submit``; a worker answers through the
pool with messages of the second group, which ``poll`` returns as
``(worker_id, message)`` pairs. A worker handles its messages in the order sent
(``_worker.serve`` is the loop every kind of worker runs, ``_worker.handle`` one step of it).

To workers
    ``Task`` (make one batch; answered by one ``Result``), ``Pause``, ``PipeOnly``,
    ``Resume``, ``SetAttrs`` (none of these is answered), ``Stop`` (end the loop;
    a pool may instead close the worker's channel).

From workers (and from the pool, for a worker that is gone)
    ``Started`` once a worker is ready (worker_init_fn returned), or ``StartFailed``
    with the error, then one ``Result`` per ``Task``; ``TransportFallback`` when a
    worker found /dev/shm full (sent before the ``Result`` it concerns). The pool
    itself reports a worker that disappeared as ``WorkerDied`` with a
    ``WorkerExit``; the tasks it held are lost, and the engine sends them again
    after ``restart``.

Every message is a NamedTuple or a frozen dataclass: cheap to pickle (a ``Result``
crosses a pipe per batch) and matched by type, never by a field's value.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, Union

# -- to workers ---------------------------------------------------------------------


class Task(NamedTuple):
    """One batch to make. ``indices`` is a list of sample indices (map-style, batched),
    one index (map-style, ``batch_size=None``), or the batch size (iterable datasets)."""

    task_id: int
    epoch: int
    batch_no: int
    indices: Any
    stream_seed: int | None = None  # an IterDataPipe's shared seed for the epoch (see _datapipes)


class Pause(NamedTuple):
    """Idle this long before the next task (spreads the workers' phases, see ``_schedule``)."""

    seconds: float


class PipeOnly(NamedTuple):
    """From now on send whole batches through the pipe, not through /dev/shm (too small).
    Workers whose batches never go through /dev/shm (threads) have nothing to change."""

    reason: str = ""


class Resume(NamedTuple):
    """Start epoch ``epoch`` of an iterable dataset where a saved run left this worker's
    stream: load ``state`` into the dataset (when not None), begin a fresh iterator, and
    pull and drop its first ``skip`` items, uncollated (the replay of the batches it
    delivered, for datasets without a state)."""

    epoch: int
    state: Any = None
    skip: int = 0
    stream_seed: int | None = None


class SetAttrs(NamedTuple):
    """Set these attributes (name -> value) on the worker's copy of the dataset: the main
    process reassigned them on its own (``set_epoch`` & co, ``sync_dataset``)."""

    attrs: dict


class Stop(NamedTuple):
    """End the worker's loop (a pool may close the worker's channel instead)."""


ToWorker = Union[Task, Pause, PipeOnly, Resume, SetAttrs, Stop]

# -- from workers -------------------------------------------------------------------


class Result(NamedTuple):
    """The answer to one ``Task``. ``kind`` is "ok" (``payload`` is the batch), "stop" (an
    iterable dataset is exhausted in this worker), "empty" (every sample of the batch was
    left out, ``skip_errors``) or "error" (``payload`` is a
    :class:`torch._utils.ExceptionWrapper`). ``started``/``done`` are the worker's
    ``time.monotonic()`` around making it (one clock for every process on a machine;
    always set), ``cpu`` the CPU time the worker's thread spent on it. ``skipped`` lists
    the ``(index, error)`` of samples left out. ``state`` is a copy of an iterable
    dataset's ``state_dict()`` right after this batch (datasets that have one), for
    ``loader.state_dict()``; ``ended`` says the stream ended while this batch was made
    (a short last batch): the worker has no more. ``drew_global``: the dataset drew from a
    global RNG (watched batches only); ``reseeded``: the global RNGs worker_init_fn seeded
    (first result of a worker)."""

    kind: str
    task_id: int
    payload: Any
    started: float
    done: float
    cpu: float = 0.0
    skipped: tuple = ()
    state: Any = None
    ended: bool = False
    drew_global: bool = False
    reseeded: frozenset = frozenset()


class Started(NamedTuple):
    """The worker has started (its worker_init_fn returned): a death from now on
    happened while it was making a batch."""


class StartFailed(NamedTuple):
    """The worker could not start: ``error`` (a ``torch._utils.ExceptionWrapper``) is
    raised in the loop, and the loader closes (a new worker would fail the same way)."""

    error: Any


class TransportFallback(NamedTuple):
    """The worker found /dev/shm full (``reason``: the first line of the error) and now
    sends its batches through its pipe; every other worker should too (``PipeOnly``)."""

    reason: str


@dataclass(frozen=True)
class FactoryExit:
    """How a worker factory process ended (see ``_factory``): ``number`` counts the
    factories this pool lost (1 for the first), ``exitcode`` as in :class:`WorkerExit`."""

    number: int
    pid: int | None
    exitcode: int | None

    def describe(self) -> str:
        """``"the nostall worker factory (pid 12) was killed by SIGKILL"``."""
        return f"the nostall worker factory (pid {self.pid}) {_how(self.exitcode)}"


@dataclass(frozen=True)
class WorkerExit:
    """How a worker ended: ``exitcode`` is negative for a signal, None if unknown; ``pid``
    None if it had none (or it is unknown). ``factory`` is set for a worker that ended
    because its factory died (the kernel kills a factory's workers with it)."""

    worker_id: int
    pid: int | None
    exitcode: int | None
    factory: FactoryExit | None = None

    def describe(self, doing: str = "") -> str:
        """``"nostall worker 0 (pid 12) was killed by SIGKILL"`` + ``doing`` (``" while making ..."``),
        and why, for a worker that died with its factory."""
        text = f"nostall worker {self.worker_id} (pid {self.pid}) {_how(self.exitcode)}{doing}"
        if self.factory is not None:
            text += f", because {self.factory.describe()} (a factory's workers die with it)"
        return text


def _how(exitcode: int | None) -> str:
    if exitcode is None:
        return "exited (exit status unknown)"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"was killed by {name}"
    return f"exited with code {exitcode}"


class WorkerDied(NamedTuple):
    """Worker ``worker_id`` is gone (``exit`` says how), with every task it held; sent by
    the pool, not the worker. The engine restarts it (``restart``) and sends the tasks
    again, or raises. ``exit`` is a :class:`WorkerExit`, or any object with its members
    (``worker_id``, ``pid``, ``exitcode``, ``factory``, ``describe(doing)``)."""

    worker_id: int
    exit: WorkerExit


FromWorker = Union[Result, Started, StartFailed, TransportFallback, WorkerDied]

# -- the pool -------------------------------------------------------------------------


class WorkerPool(Protocol):
    """What the engine, supervision and transport policy use of a pool of workers.

    Starting is constructing: a pool is built with the work spec, ``num_workers``, the
    base seed and how many of them to start now (workers ``0 .. start-1``; see
    ``_engine.make_pool``), and each started worker soon answers ``Started`` or
    ``StartFailed``. Worker ids are small ints; messages are those of this module.
    """

    passes_attrs: bool
    """Workers hold their own copy of the dataset: attribute changes are sent (``SetAttrs``)."""
    uses_shm: bool
    """Batches cross /dev/shm (process workers): its room is checked, ``PipeOnly`` matters."""
    can_restart: bool
    """A stuck worker can be killed and replaced (``kill``, ``restart``); False for threads."""
    blocked: float
    """Seconds the last ``poll`` waited for its first message (for the tuner)."""
    poll_progressed: bool
    """The last ``poll`` saw progress even if it returned nothing (resets ``timeout``)."""
    pids: dict
    """Worker id -> process id of the running workers that have one (errors, hang reports)."""
    exits: dict
    """Worker id -> the last ``WorkerExit`` reported for it (``iter(loader)._workers``)."""
    owner_pid: int
    """The process that made the pool; only it may use the workers."""

    @property
    def foreign(self) -> bool:
        """True in a forked child of the process that made the pool (see ``owner_pid``)."""

    def submit(self, worker_id: int, msg: ToWorker) -> None:
        """Send one message to a worker; a worker that is gone is ignored (``poll`` reports it)."""

    def poll(self, timeout: float | None) -> list[tuple[int, FromWorker]]:
        """Wait up to ``timeout`` seconds for messages; return every ``(worker_id, message)`` arrived."""

    def add(self, worker_id: int) -> None:
        """Start one more worker (the tuner raised num_workers)."""

    def restart(self, worker_id: int) -> None:
        """Start a new worker under ``worker_id`` in place of one reported by ``WorkerDied``."""

    def kill(self, worker_id: int) -> None:
        """Stop a hung worker (``can_restart`` pools only); ``poll`` then reports ``WorkerDied``."""

    def stack(self, worker_id: int) -> str | None:
        """The worker's Python stack now, for a hang report (None if it cannot be read)."""

    def wait_started(self, timeout: float = 30.0) -> dict:
        """Block until every running worker's pid is known; return ``pids`` of those."""

    def close(self) -> None:
        """End every worker; idempotent, returns within about a second."""
