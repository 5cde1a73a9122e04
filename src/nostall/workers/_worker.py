"""What a worker does: fetch samples, collate, send. Nothing else.

``BatchMaker`` is shared by process workers, thread workers and in-process loading,
so a batch is made the same way whatever runs it.
"""

from __future__ import annotations

import copy
import os
import queue
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils.data._utils import worker as torch_worker
from torch.utils.data._utils.fetch import _IterableDatasetFetcher

from ..observe import _diagnose
from . import _datapipes, _limits, _procname, _seeding, _stateful, _transport
from ._protocol import (Pause, PipeOnly, Result, Resume, SetAttrs, Started, StartFailed, Stop, Task,
                        TransportFallback)


@dataclass(frozen=True)
class WorkSpec:
    """Everything a worker needs to make batches; serialized once per pool, not per worker."""

    dataset: Any
    iterable: bool
    auto_collation: bool
    collate_fn: Callable
    drop_last: bool
    worker_init_fn: Callable | None
    skip_errors: bool = False  # leave failing samples out of their batch instead of raising
    watch_globals: bool = False  # report batches that draw from the global RNGs (worker_type="auto")
    shards: tuple[int, int] | None = None  # a DataPipe's (world size, rank): sharded as torch does


_WATCHED_BATCHES = 8  # batches per worker checked for global-RNG draws (worker_type="auto")


class BatchMaker:
    """Makes batches from tasks, seeding randomness per batch (see ``_seeding``)."""

    def __init__(self, spec: WorkSpec, base_seed: int, worker_id: int | None, seed_globals: bool,
                 keep_state: str | None = None, reseeded: frozenset = frozenset()):
        self.spec = spec
        self.dataset = spec.dataset
        self.base_seed = base_seed
        self.worker_id = worker_id
        # The global RNGs seeded per batch: not those worker_init_fn seeded (the user's seed wins).
        self.seeded = (_seeding.GLOBALS - reseeded) if seed_globals else frozenset()
        self._reseeded = reseeded  # told to the loader with the first result
        self.rng = _seeding.WorkerRNG.create()
        self._fetcher = None
        self._fetcher_epoch = None
        self._skipped: list = []
        self.no_shm = False  # set when /dev/shm is too small (see PipeOnly)
        self.fallback: TransportFallback | None = None  # /dev/shm was found full: for the loader, before the result
        # The state after each batch, for loader.state_dict(): only for an iterable dataset
        # whose state_dict() takes no arguments (decided once, here). "send": a process
        # worker pickles it with the batch before the dataset changes again, so no copy;
        # "copy": a thread worker keeps it in memory. In-process loading takes it when saved.
        self._keep_state = keep_state if spec.iterable and _stateful.stateful(spec.dataset) else None
        self._state = None  # the dataset's state after the batch just made
        self._ended = False  # the stream ended within the batch just made
        self._resume_error = None  # a failed Resume, reported with the next batch
        self._watch_left = _WATCHED_BATCHES if spec.watch_globals else 0
        self._drew_global = False

    def apply_attrs(self, attrs: dict) -> None:
        """Mirror attributes the main process reassigned on its dataset (e.g. by set_epoch)."""
        for name, value in attrs.items():
            setattr(self.dataset, name, value)

    def make(self, task: Task) -> Result:
        """Make the batch of ``task`` (see :class:`Result`)."""
        started, cpu = time.monotonic(), time.thread_time()
        self._skipped = []
        kind, payload = self._make(task)
        state, self._state = self._state, None
        ended, self._ended = self._ended, False
        drew, self._drew_global = self._drew_global, False
        reseeded, self._reseeded = self._reseeded, frozenset()
        return Result(kind, task.task_id, payload, started, time.monotonic(), time.thread_time() - cpu,
                      tuple(self._skipped), state, ended, drew, reseeded)

    def _make(self, task: Task) -> tuple:
        seed = _seeding.batch_seed(self.base_seed, task.epoch, task.batch_no)
        if self.seeded:
            _seeding.seed_globals(seed, self.seeded)
        watched = _seeding.global_rng_fingerprint() if self._watch_left > 0 else None
        _seeding._begin_batch(self.rng, seed)
        current = [task.indices]
        try:
            if self.spec.iterable:
                if self._resume_error is not None:
                    error, self._resume_error = self._resume_error, None
                    return "error", error
                data = self._fetch_iterable(task)
                if data is None:
                    return "stop", None
                # A dataset may reset its state when its iterator ends: the end is told apart.
                self._ended = self._fetcher.ended
                if self._keep_state is not None:
                    state = self.dataset.state_dict()  # the dataset's own dict goes on changing:
                    self._state = state if self._keep_state == "send" else copy.deepcopy(state)
                return "ok", data
            data = self._fetch_map(task.indices, current)
            return ("empty", None) if data is _EMPTY else ("ok", data)
        except Exception:
            return "error", caught(self.worker_id, self._where(task, current[0]))
        except EXITS:
            if self.worker_id is None:
                raise  # in-process loading: the loop's own KeyboardInterrupt, as in torch
            return "error", caught(self.worker_id, self._where(task, current[0]))
        finally:
            _seeding._end_batch()
            if watched is not None:
                self._watch_left -= 1
                self._drew_global = _seeding.global_rng_fingerprint() != watched

    def _fetch_map(self, indices, current: list):
        spec = self.spec
        if spec.skip_errors:
            return self._fetch_skipping(indices, current)
        if not spec.auto_collation:
            current[0] = indices
            return self._collate(self.dataset[indices])
        getitems = getattr(self.dataset, "__getitems__", None)
        if getitems:
            data = getitems(indices)
        else:
            data = []
            for index in indices:
                current[0] = index
                data.append(self.dataset[index])
        current[0] = indices
        return self._collate(data)

    def _collate(self, data):
        if not self.no_shm:
            try:
                return self.spec.collate_fn(data)
            except RuntimeError as exc:
                if "shared memory" not in str(exc):
                    raise
                _limits.remove_failed_shm(exc)  # torch leaves the empty file it could not fill
                self.no_shm = True  # /dev/shm is full: this and later batches go through the pipe
                self.fallback = TransportFallback(str(exc).splitlines()[0])
        # torch's default_collate puts a worker's batch in shared memory when it sees
        # worker info; with /dev/shm too small that fails or dies of SIGBUS.
        saved, torch_worker._worker_info = torch_worker._worker_info, None
        try:
            return self.spec.collate_fn(data)
        finally:
            torch_worker._worker_info = saved

    def _fetch_skipping(self, indices, current: list):
        """Like ``_fetch_map``, but a sample that raises is left out and recorded; the
        batch keeps every other sample it was planned with (no replacement). Errors
        in ``collate_fn`` are not the sample's: they still raise."""
        spec = self.spec
        if not spec.auto_collation:
            current[0] = indices
            try:
                sample = self.dataset[indices]
            except Exception as exc:
                self._skipped.append((indices, _error_and_place(exc)))
                return _EMPTY
            return self._collate(sample)
        getitems = getattr(self.dataset, "__getitems__", None)
        if getitems:
            try:
                data = getitems(indices)
            except Exception:
                data = None  # find the failing samples one by one
            if data is not None:
                current[0] = indices
                return self._collate(data)
        data = []
        for index in indices:
            current[0] = index
            try:
                data.append(getitems([index])[0] if getitems else self.dataset[index])
            except Exception as exc:
                self._skipped.append((index, _error_and_place(exc)))
        if not data:
            return _EMPTY
        current[0] = indices
        return self._collate(data)

    def _fetch_iterable(self, task: Task):
        spec = self.spec
        if self._fetcher_epoch != task.epoch:
            if task.stream_seed is not None:
                _datapipes.reseed(self.dataset, task.stream_seed)
            self._fetcher = _IterableDatasetFetcher(
                self.dataset, spec.auto_collation, self._collate, spec.drop_last
            )
            self._fetcher_epoch = task.epoch
        try:
            return self._fetcher.fetch(range(task.indices) if spec.auto_collation else None)
        except StopIteration:
            return None

    def resume(self, msg: Resume) -> None:
        """Begin epoch ``msg.epoch``'s stream where the saved run left it (see :class:`Resume`)."""
        spec = self.spec
        try:
            if msg.stream_seed is not None:
                _datapipes.reseed(self.dataset, msg.stream_seed)
            if msg.state is not None:
                self.dataset.load_state_dict(msg.state)
            self._fetcher = _IterableDatasetFetcher(self.dataset, spec.auto_collation, self._collate, spec.drop_last)
            self._fetcher_epoch = msg.epoch
            stream = self._fetcher.dataset_iter
            for _ in range(msg.skip):
                next(stream)
        except StopIteration:
            self._fetcher.ended = True
        except Exception:
            who = "the main process" if self.worker_id is None else f"worker {self.worker_id} (pid {os.getpid()})"
            what = "loading the saved dataset state" if msg.state is not None else f"skipping {msg.skip} samples"
            self._resume_error = caught(self.worker_id, f"in nostall {who} while {what} to resume epoch {msg.epoch}")

    def _where(self, task: Task, index) -> str:
        who = "the main process" if self.worker_id is None else f"nostall worker {self.worker_id} (pid {os.getpid()})"
        what = f"batch {task.batch_no} of epoch {task.epoch}"
        if not self.spec.iterable:
            label = "sample index" if not isinstance(index, list) else "sample indices"
            what += f", {label} {index}"
        return f"in {who} while making {what}"


_EMPTY = object()  # every sample of the batch was skipped


class InlineError:
    """An error raised while loading in the main process (``num_workers=0``).

    Re-raised as the original exception object, as torch does, so its type, message
    and traceback are the user's; nostall's details ride along as a note (Python 3.11+).
    """

    def __init__(self, exc: BaseException, detail: str):
        self.exc = exc
        if hasattr(exc, "add_note"):
            exc.add_note(f"Raised {detail}.")

    def reraise(self):
        raise self.exc


# Raised by user code in a worker (workers ignore SIGINT, so Ctrl-C never raises there):
# a deliberate exit from dataset code, reported once with the sample, not a crash to
# retry (as an uncaught exception it ended the process, and the batch was made again).
EXITS = (KeyboardInterrupt, SystemExit)


class ExitInWorker(torch._utils.ExceptionWrapper):
    """A KeyboardInterrupt or SystemExit from dataset code in a worker, raised in the
    loader's process as a RuntimeError with torch's first line ("Caught KeyboardInterrupt
    in DataLoader worker process 0."). Not re-raised as itself: in the training loop a
    KeyboardInterrupt reads as the user's Ctrl-C (frameworks shut down "gracefully" on
    it), and a SystemExit would end the program without a traceback."""

    def reraise(self):
        raise RuntimeError(f"Caught {self.exc_type.__name__} {self.where}.\nOriginal {self.exc_msg}")


def caught(worker_id: int | None, detail: str):
    """The exception being handled, packed to be raised in the loader's process like torch's.

    Workers: a ``torch._utils.ExceptionWrapper`` whose message starts as torch's
    ("Caught ValueError in DataLoader worker process 0.\nOriginal Traceback ...") so code
    and log alerts written for torch keep matching; nostall's ``detail`` (pid, batch,
    epoch, sample indices) follows the original traceback. Main process: the original
    exception itself (:class:`InlineError`).
    """
    if worker_id is None:
        return InlineError(sys.exc_info()[1], detail)
    kind = "process" if threading.current_thread() is threading.main_thread() else "thread"
    exc = sys.exc_info()[1]
    if isinstance(exc, EXITS):
        wrapper = ExitInWorker(where=f"in DataLoader worker {kind} {worker_id}")
        name = type(exc).__name__
        wrapper.exc_msg = (
            f"{wrapper.exc_msg.rstrip()}\nRaised {detail}.\nnostall: the dataset code raised {name} "
            f"({name}: {exc}) inside the worker, which would only end that worker (workers ignore "
            "Ctrl-C: this was raised by the code, not typed). It is reported once, as this RuntimeError; "
            "the batch is not made again and the worker goes on. To fail a sample, raise an Exception "
            "(on_sample_error='skip' then leaves it out); to stop training, raise in the training loop."
        )
        return wrapper
    wrapper = torch._utils.ExceptionWrapper(where=f"in DataLoader worker {kind} {worker_id}")
    wrapper.exc_msg = f"{wrapper.exc_msg.rstrip()}\nRaised {detail}."
    return wrapper


def _error_and_place(exc: BaseException) -> str:
    """``"ValueError: bad pixel (dataset.py:12 in __getitem__)"``: the error and where it arose."""
    where = ""
    tb = traceback.extract_tb(exc.__traceback__)
    if tb:
        last = tb[-1]
        where = f" ({os.path.basename(last.filename)}:{last.lineno} in {last.name})"
    return f"{type(exc).__name__}: {exc}{where}"


def _install_worker_info(worker_id: int, num_workers: int, seed: int, dataset, method: str):
    # torch >= 2.9 records the worker method and, for threads, per-thread generators
    # (torch.thread_safe_generator() reads them); older WorkerInfo has neither field.
    fields = torch_worker.WorkerInfo.__dataclass_fields__
    extra = {"worker_method": method} if "worker_method" in fields else {}
    if method == "thread" and "rng" in fields:
        extra["rng"] = _seeding.ThreadWorkerRNG(seed)
    info = torch_worker.WorkerInfo(id=worker_id, num_workers=num_workers, seed=seed, dataset=dataset, **extra)
    if method == "thread":
        _thread_info.info = info
    else:
        torch_worker._worker_info = info
    return info


def _start(spec: WorkSpec, worker_id: int, num_workers: int, base_seed: int, method: str):
    """Seed like torch (base_seed + worker_id), publish WorkerInfo, run worker_init_fn.

    Returns ``(BatchMaker, None)``, or ``(None, StartFailed)`` carrying the start-up error.
    """
    threaded = method == "thread"
    try:
        seed = base_seed + worker_id
        if not threaded:
            _seeding.seed_globals(seed)
        _install_worker_info(worker_id, num_workers, seed, spec.dataset, method)
        if spec.shards is not None:  # before worker_init_fn, as torch's loader does
            _datapipes.shard(spec.dataset, spec.shards, num_workers, worker_id)
        reseeded = frozenset()
        if spec.worker_init_fn is not None:
            before = None if threaded else _seeding.global_snapshot()
            spec.worker_init_fn(worker_id)
            if before is not None:
                reseeded = _seeding.reseeded_since(before)
        maker = BatchMaker(spec, base_seed, worker_id, seed_globals=not threaded,
                           keep_state="copy" if threaded else "send", reseeded=reseeded)
        return maker, None
    except (Exception, *EXITS):
        who = f"thread worker {worker_id}" if threaded else f"worker {worker_id} (pid {os.getpid()})"
        return None, StartFailed(caught(worker_id, f"in nostall {who} while starting (worker_init_fn)"))


def serve(maker: BatchMaker, receive: Callable[[], Any], send: Callable[[Any], bool]) -> None:
    """The loop of every kind of worker: ``handle`` each message from ``receive()``, in
    order, until ``Stop`` or until ``send`` returns False (the loader is gone)."""
    while handle(maker, receive(), send):
        pass


def handle(maker: BatchMaker, msg, send: Callable[[Any], bool]) -> bool:
    """Act on one message of ``_protocol`` (a worker's whole behaviour; ``serve`` loops over
    it, a pool whose workers take one call per message calls it directly). A ``Task`` is
    answered with one ``Result`` through ``send``, preceded by a ``TransportFallback`` when
    /dev/shm was found full; an exception from ``send`` (a batch that cannot be pickled)
    is sent instead as the batch's error. Returns False when the worker should end:
    ``Stop``, or ``send`` returned False."""
    if isinstance(msg, Task):  # first: the one message of the hot path
        result = maker.make(msg)
        if maker.fallback is not None:
            fallback, maker.fallback = maker.fallback, None
            if not send(fallback):
                return False
        try:
            return send(result)
        except Exception:
            wrapper = caught(maker.worker_id, f"in nostall worker {maker.worker_id} (pid {os.getpid()}) while "
                             f"sending batch {msg.batch_no} of epoch {msg.epoch} (the batch could not be pickled)")
            return send(Result("error", msg.task_id, wrapper, result.started, result.done, result.cpu))
    if isinstance(msg, Pause):
        time.sleep(msg.seconds)
    elif isinstance(msg, SetAttrs):  # sent only to a worker holding its own copy of the dataset
        maker.apply_attrs(msg.attrs)
    elif isinstance(msg, Resume):
        maker.resume(msg)
    elif isinstance(msg, PipeOnly):
        maker.no_shm = True  # a thread worker's batches never go through /dev/shm: no effect there
    elif isinstance(msg, Stop):
        return False
    else:
        raise TypeError(f"nostall worker {maker.worker_id} received {msg!r}, which is not a message of "
                        "nostall.workers._protocol (Task, Pause, SetAttrs, Resume, PipeOnly, Stop): the pool that sent "
                        "it does not follow the worker protocol")
    return True


def _read_tasks_in_background(conn) -> queue.SimpleQueue:
    """Drain the loader's messages into a queue as they come.

    Without this, a loader sending large tasks (huge index lists) to a worker that
    is itself blocked sending a large result could wait on each other forever:
    each side's socket buffer full, neither reading. The end of the pipe is put as ``Stop``.
    """
    inbox: queue.SimpleQueue = queue.SimpleQueue()

    def read() -> None:
        try:
            while True:
                inbox.put(conn.recv())
        except (EOFError, OSError):
            inbox.put(Stop())

    threading.Thread(target=read, name="nostall-task-reader", daemon=True).start()
    return inbox


def process_main(conn, worker_id: int, num_workers: int, base_seed: int, spec: WorkSpec) -> None:
    """Body of a worker process: receive messages on ``conn``, answer with results (``serve``).

    The loop ends when the loader closes its end of the pipe, so a worker never
    outlives its loader.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the training loop's to handle
    _diagnose.install_stack_dump()  # the loader asks for our stack when a batch hangs
    torch.set_num_threads(1)
    maker, failure = _start(spec, worker_id, num_workers, base_seed, "multiprocessing")
    if failure is not None:
        conn.send_bytes(_transport.dumps(failure))
        return

    def send(msg) -> bool:
        try:
            data = _dumps(msg, maker) if type(msg) is Result else _transport.dumps(msg)
            if maker.fallback is not None:  # _dumps found /dev/shm full: say so before the batch
                fallback, maker.fallback = maker.fallback, None
                conn.send_bytes(_transport.dumps(fallback))
            conn.send_bytes(data)
        except (BrokenPipeError, ConnectionResetError, OSError):
            return False
        return True

    if send(Started()):  # else the loader closed while this worker was starting
        serve(maker, _read_tasks_in_background(conn).get, send)


def _dumps(result: Result, maker: BatchMaker):
    """``result`` serialized for the pipe. A large tensor the batch does not hold in
    shared memory yet (``batch_size=None``, a custom collate_fn) is put there while
    pickling; when /dev/shm has no room for it, this batch and later ones go whole
    through the pipe instead (``maker.fallback`` says so), as when collating fails for that reason."""
    if not maker.no_shm:
        try:
            return _transport.dumps(result)
        except RuntimeError as exc:
            if "shared memory" not in str(exc):
                raise
            _limits.remove_failed_shm(exc)
            maker.no_shm = True
            maker.fallback = TransportFallback(str(exc).splitlines()[0])
    return _transport.dumps(result, inline_all=True)


# Thread workers: torch's get_worker_info() returns one module global, which threads
# share. Teaching torch's own function to look at a thread-local first makes every
# reference to it (including `from torch.utils.data import get_worker_info` done
# before nostall was imported) answer correctly inside thread workers.
_thread_info = threading.local()


def _thread_aware_get_worker_info():  # runs with torch's worker module as its globals
    info = getattr(_nostall_thread_info, "info", None)  # noqa: F821
    return info if info is not None else _worker_info  # noqa: F821


def install_thread_worker_info() -> None:
    """Make ``torch.utils.data.get_worker_info`` answer inside nostall thread workers."""
    if getattr(torch_worker, "_nostall_thread_info", None) is None:
        torch_worker._nostall_thread_info = _thread_info
        torch_worker.get_worker_info.__code__ = _thread_aware_get_worker_info.__code__


def thread_main(inbox, outbox, worker_id: int, num_workers: int, base_seed: int, spec: WorkSpec) -> None:
    """Body of a thread worker: messages from ``inbox`` (a queue), ``(worker_id, message)``
    pairs to ``outbox`` (``serve``, as process workers)."""
    _procname.set_comm(_procname.worker_names(worker_id)[1])  # this thread's name in top -H
    maker, failure = _start(spec, worker_id, num_workers, base_seed, "thread")
    if failure is not None:
        outbox.put((worker_id, failure))
        return

    def send(msg) -> bool:
        outbox.put((worker_id, msg))
        return True

    try:
        send(Started())
        serve(maker, inbox.get, send)
    finally:
        _thread_info.info = None
