"""Persistent worker pools behind one small interface: submit, poll, close.

``ProcessPool`` runs workers forked from a factory process (see ``_zygote``);
``ThreadPool`` runs them as threads of this process. Both deliver
``(worker_id, Result)`` pairs from ``poll``. A worker that disappears is reported as
a ``Result`` of kind "died" whose payload is a :class:`WorkerExit`.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import queue
import signal
import threading
import time
import weakref
from dataclasses import dataclass
from multiprocessing import connection, reduction, util

from . import _diagnose, _pickling, _transport, _worker, _zygote


@dataclass(frozen=True)
class WorkerExit:
    """How a worker process ended: ``exitcode`` is negative for a signal, None if unknown."""

    worker_id: int
    pid: int | None
    exitcode: int | None

    def describe(self) -> str:
        if self.exitcode is None:
            how = "exited (exit status unknown)"
        elif self.exitcode < 0:
            try:
                name = signal.Signals(-self.exitcode).name
            except ValueError:
                name = f"signal {-self.exitcode}"
            how = f"was killed by {name}"
        else:
            how = f"exited with code {self.exitcode}"
        return f"nostall worker {self.worker_id} (pid {self.pid}) {how}"


class ProcessPool:
    """Worker processes forked from one factory process started with ``ctx``."""

    passes_attrs = True  # workers hold their own copy of the dataset
    can_restart = True
    poll_progressed = False
    blocked = 0.0

    def __init__(self, ctx, spec: _worker.WorkSpec, num_workers: int, base_seed: int, start: int | None = None):
        self.num_workers = num_workers  # what get_worker_info() says; ``start`` of them run at first
        method = ctx.get_start_method()
        if method != "fork" and _diagnose.in_spawned_bootstrap():
            # We are a spawned process re-importing the user's script, which starts a
            # loader at import time: stop here with one clear line, not pages of traceback.
            raise SystemExit(
                "nostall: this process was started with "
                f"{method} and is importing the main script again, which builds and iterates a "
                "DataLoader outside `if __name__ == \"__main__\":`. " + _diagnose.GUARD_FIX
            )
        self._method = method
        self._control, child = ctx.Pipe(duplex=True)
        kwargs = {"parent_end": self._control} if method == "fork" else {}
        self._factory = ctx.Process(
            target=_zygote.factory_main,
            args=(child, num_workers, base_seed, spec),
            kwargs=kwargs,
            name="nostall-factory",
            daemon=False,  # it forks the workers; daemonic processes may not have children
        )
        try:
            self._factory.start()  # spawn/forkserver pickle the spec here, once
        except Exception:
            child.close()
            self._control.close()
            _pickling.check_picklable(  # name the culprit, if pickling was the problem
                method, dataset=spec.dataset, collate_fn=spec.collate_fn, worker_init_fn=spec.worker_init_fn
            )
            raise
        child.close()
        # multiprocessing's exit handler joins every non-daemonic child, the factory
        # included, and in a multiprocessing child (torch.multiprocessing.spawn) it is
        # the only cleanup that runs: close the pool first, or that join never ends.
        self._at_exit = util.Finalize(self, _close_at_exit, args=(weakref.ref(self),), exitpriority=10)
        self._conns: dict[int, connection.Connection] = {}
        self._worker_of: dict[connection.Connection, int] = {}
        self.pids: dict[int, int] = {}
        self._exits: dict[int, WorkerExit] = {}
        self._closed = False
        for worker_id in range(num_workers if start is None else start):
            self._start_worker(worker_id)

    def add(self, worker_id: int) -> None:
        """Start one more worker (num_workers="auto")."""
        self._start_worker(worker_id)

    def _start_worker(self, worker_id: int) -> None:
        mine, theirs = connection.Pipe(duplex=True)
        self._control.send(("start", worker_id))
        reduction.send_handle(self._control, theirs.fileno(), self._factory.pid)
        theirs.close()
        self._conns[worker_id] = mine
        self._worker_of[mine] = worker_id

    def submit(self, worker_id: int, msg) -> None:
        """Send a task (or an attribute update, a dict) to one worker."""
        conn = self._conns.get(worker_id)
        if conn is None:
            return  # gone and reported; restart() gives the id a new worker
        try:
            conn.send(msg)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the worker is gone; poll() reports it with its exit status

    def poll(self, timeout: float | None) -> list:
        """Wait up to ``timeout`` seconds for results; return what has arrived.
        ``blocked`` is how long it waited for the first one (not reading it)."""
        started = time.monotonic()
        ready = connection.wait([*self._conns.values(), self._control], timeout)
        self.blocked = time.monotonic() - started
        self.poll_progressed = bool(ready)
        out = []
        for conn in ready:
            if conn is self._control:
                self._read_control()
                continue
            worker_id = self._worker_of[conn]
            try:
                data = conn.recv_bytes()
            except (EOFError, OSError):
                out.append((worker_id, _worker.Result("died", -1, self._exit_of(worker_id))))
                self._drop(worker_id)
                continue
            out.append((worker_id, _transport.loads(data)))
        return out

    def _read_control(self, timeout: float = 0.0) -> bool:
        if not self._control.poll(timeout):
            return False
        try:
            msg = self._control.recv()
        except (EOFError, OSError):
            self._factory.join(1.0)
            unguarded = _diagnose.unguarded_main_lines() if self._method != "fork" else None
            if unguarded and not self.pids:
                raise RuntimeError(
                    f"the nostall worker factory (pid {self._factory.pid}) could not start under "
                    f"{self._method}: it imports the main script again, and {unguarded}, outside "
                    "`if __name__ == \"__main__\":`. " + _diagnose.GUARD_FIX
                ) from None
            raise RuntimeError(
                f"the nostall worker factory (pid {self._factory.pid}) ended unexpectedly "
                f"with exit code {self._factory.exitcode}; its workers are gone. This usually "
                "means the process was killed (out of memory?), the dataset could not be "
                "unpickled in a fresh interpreter, or, under spawn/forkserver, the script "
                "lacks an `if __name__ == \"__main__\":` guard (see the error printed above)."
            ) from None
        if msg[0] == "started":
            self.pids[msg[1]] = msg[2]
        elif msg[0] == "exited":
            self._exits[msg[1]] = WorkerExit(msg[1], msg[2], msg[3])
        return True

    def _exit_of(self, worker_id: int) -> WorkerExit:
        # The factory reports the exit status just after the pipe closes; wait briefly.
        deadline = time.monotonic() + 1.0
        while not self._exit_known(worker_id) and time.monotonic() < deadline:
            if not self._read_control(timeout=0.05) and not self._factory.is_alive():
                break
        if self._exit_known(worker_id):
            return self._exits.pop(worker_id)
        return WorkerExit(worker_id, self.pids.get(worker_id), None)

    def _exit_known(self, worker_id: int) -> bool:
        # The exit of this worker id's current process, not of one it replaced.
        exit, pid = self._exits.get(worker_id), self.pids.get(worker_id)
        return exit is not None and (pid is None or exit.pid == pid)

    def restart(self, worker_id: int) -> None:
        """Start a new worker under ``worker_id`` in place of one that is gone."""
        self.pids.pop(worker_id, None)
        self._start_worker(worker_id)

    def kill(self, worker_id: int) -> None:
        """Kill a (hung) worker; ``poll`` then reports it as died."""
        pid = self.pids.get(worker_id)
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stack(self, worker_id: int) -> str | None:
        """The worker's Python stack, asked for with a signal (see ``_diagnose``)."""
        pid = self.pids.get(worker_id)
        return _diagnose.process_stack(pid) if pid is not None else None

    def _drop(self, worker_id: int) -> None:
        conn = self._conns.pop(worker_id)
        del self._worker_of[conn]
        conn.close()

    def wait_started(self, timeout: float = 30.0) -> dict:
        """Block until every worker's pid is known (for tests and diagnostics)."""
        deadline = time.monotonic() + timeout
        while len(self.pids) < len(self._conns) and time.monotonic() < deadline:
            self._read_control(timeout=0.1)
        return dict(self.pids)

    def close(self) -> None:
        """End every worker and the factory; returns within about a second."""
        if self._closed:
            return
        self._closed = True
        self._at_exit.cancel()
        for conn in self._conns.values():
            conn.close()  # workers see the end of their pipe and return; never blocks
        self._conns.clear()
        self._worker_of.clear()
        try:
            self._control.send(("stop",))
        except OSError:
            pass
        self._factory.join(2.0)
        if self._factory.is_alive():
            self._factory.kill()
            self._factory.join(1.0)
        self._control.close()
        self._factory.close()


def _close_at_exit(pool_ref) -> None:
    # Finalize runs this only in the process that made the pool (it checks the pid).
    pool = pool_ref()
    if pool is not None:
        pool.close()


class ThreadPool:
    """Worker threads in this process. They share a map-style dataset object with it;
    each worker of an iterable dataset holds its own copy, as torch's process workers
    do: a dataset that shards its stream by ``get_worker_info()`` or keeps its position
    on itself (litdata's ``StreamingDataset`` is its own iterator) needs one per worker."""

    can_restart = False  # a thread stuck in user code cannot be stopped
    poll_progressed = False
    blocked = 0.0

    def __init__(self, spec: _worker.WorkSpec, num_workers: int, base_seed: int, start: int | None = None):
        _worker.install_thread_worker_info()
        self.passes_attrs = spec.iterable  # own copies: attributes set in the main process are mirrored
        self.num_workers = num_workers
        self._spec, self._base_seed = spec, base_seed
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._inboxes: dict[int, queue.SimpleQueue] = {}
        self._threads: dict[int, threading.Thread] = {}
        self.pids = {}
        self._closed = False
        for worker_id in range(num_workers if start is None else start):
            self.add(worker_id)

    def add(self, worker_id: int) -> None:
        """Start one more worker thread."""
        spec = self._spec
        if spec.iterable:
            spec = dataclasses.replace(spec, dataset=_thread_copy(spec.dataset, worker_id))
        self._inboxes[worker_id] = queue.SimpleQueue()
        thread = threading.Thread(
            target=_worker.thread_main,
            args=(self._inboxes[worker_id], self._outbox, worker_id, self.num_workers, self._base_seed, spec),
            name=f"nostall-worker-{worker_id}",
            daemon=True,
        )
        self._threads[worker_id] = thread
        thread.start()

    def submit(self, worker_id: int, msg) -> None:
        self._inboxes[worker_id].put(msg)

    def poll(self, timeout: float | None) -> list:
        self.poll_progressed = False
        started = time.monotonic()
        try:
            out = [self._outbox.get(timeout=timeout)]
        except queue.Empty:
            return []
        finally:
            self.blocked = time.monotonic() - started
        while True:
            try:
                out.append(self._outbox.get_nowait())
            except queue.Empty:
                return out

    def wait_started(self, timeout: float = 30.0) -> dict:
        return {}

    def stack(self, worker_id: int) -> str | None:
        """The worker thread's Python stack."""
        return _diagnose.thread_stack(self._threads[worker_id])

    def close(self) -> None:
        """Ask every thread to stop; a thread stuck in user code is left as a daemon."""
        if self._closed:
            return
        self._closed = True
        for inbox in self._inboxes.values():
            inbox.put(None)
        deadline = time.monotonic() + 1.0
        for thread in self._threads.values():
            thread.join(max(0.0, deadline - time.monotonic()))


def _thread_copy(dataset, worker_id: int):
    """Thread worker ``worker_id``'s own copy of an iterable dataset (see ``ThreadPool``)."""
    try:
        return copy.deepcopy(dataset)
    except Exception as exc:
        raise RuntimeError(
            f"worker_type='thread' gives each worker of an iterable dataset its own copy of it, as torch's "
            f"process workers have (a shared object would hand the same stream, or the same position, to "
            f"every thread), but copy.deepcopy of the {type(dataset).__name__} for thread worker {worker_id} "
            f"failed: {type(exc).__name__}: {exc}. Use worker_type='process', or make the dataset copyable "
            "(e.g. open files and connections in __iter__, not in __init__)."
        ) from exc
