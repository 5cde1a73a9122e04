"""Persistent worker pools: the two implementations of ``_protocol.WorkerPool``.

``ProcessPool`` runs workers forked from a factory process (see ``_factory``), and
under ``fork`` its first workers straight from this process;
``ThreadPool`` runs them as threads of this process. Both deliver
``(worker_id, message)`` pairs from ``poll`` (messages of ``_protocol``). A worker
process that disappears is reported as ``WorkerDied`` with a :class:`WorkerExit`.
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
import multiprocessing.process
from multiprocessing import connection, reduction, util

from ..observe import _diagnose
from . import _factory, _limits, _pickling, _transport, _worker
from ._protocol import FactoryExit, Stop, WorkerDied, WorkerExit

# Pools of this process, for the fork hook below. A pool belongs to the process that
# made it: a forked child (os.fork(), a fork-started multiprocessing child, a torch
# worker) holds copies of its pipes, and reading or writing them would take batches
# from the parent or end its workers.
_pools: weakref.WeakSet = weakref.WeakSet()


def _disown_after_fork() -> None:
    """In a forked child: drop the child's copies of every pool's pipes at once.

    Nothing else is touched: the workers, the factory and their files are the
    parent's. Closing the copies also keeps a long-lived child from holding the
    workers' pipes open after the parent closes the loader.
    """
    for pool in list(_pools):
        pool.disown()


os.register_at_fork(after_in_child=_disown_after_fork)

# Under fork, start the first workers with one fork each from this process, as torch
# does: a worker forked by the factory (itself a fork of this process) starts 5-10 ms
# later, which is most of a short run's time to first batch. The factory is started
# when a worker must be replaced or added. False: every worker comes from the factory.
FORK_FIRST_WORKERS = True


class ProcessPool:
    """Worker processes forked from one factory process started with ``ctx``.

    The factory is replaceable: when it dies (the out-of-memory killer picks large
    processes, and it holds the dataset), its workers die with it; ``poll`` reports
    each of them as died, and the next worker started brings up a new factory (a
    new fork of this process, or a fresh interpreter sent the spec again). A factory
    that ends by itself before it answered (it could not start: an unguarded main
    script, a dataset that cannot be unpickled) raises instead: a new one would too.

    Under ``fork`` (see ``FORK_FIRST_WORKERS``) the first workers are this process's
    own children and no factory runs until a worker is replaced or added; such a
    worker is reaped here (``_direct``) and does not die with a factory."""

    passes_attrs = True  # workers hold their own copy of the dataset
    uses_shm = True
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
        self._ctx, self._method = ctx, method
        self._spec, self._base_seed = spec, base_seed
        self._conns: dict[int, connection.Connection] = {}
        self._worker_of: dict[connection.Connection, int] = {}
        self.pids: dict[int, int] = {}
        self.exits: dict[int, WorkerExit] = {}  # the last exit the factory reported, per worker id
        self._lost: list = []  # (worker_id, WorkerDied) of workers that died with a factory, not yet polled
        self.factory_exits: list[FactoryExit] = []  # factories this pool lost
        self._factory = None  # None before the first factory (fork), and between a factory's death and the next worker start
        self._control = self._factory_fd = None
        self._answered = False
        self._direct: dict = {}  # worker_id -> multiprocessing.Process of workers forked from this process
        self._retired: list = []  # such processes replaced before they were seen to end: reaped in close()
        self._closed = False
        self.owner_pid = os.getpid()
        # PR_SET_PDEATHSIG fires when the forking *thread* ends: fork workers from this
        # process only on the main thread, so that they die with the process, not the thread.
        direct = method == "fork" and FORK_FIRST_WORKERS and threading.current_thread() is threading.main_thread()
        if not direct:
            self._start_factory()
        _pools.add(self)  # after the first factory's fork, before the workers': the hook is for later forks
        # multiprocessing's exit handler joins every non-daemonic child, the factory
        # included, and in a multiprocessing child (torch.multiprocessing.spawn) it is
        # the only cleanup that runs: close the pool first, or that join never ends.
        self._at_exit = util.Finalize(self, _close_at_exit, args=(weakref.ref(self),), exitpriority=10)
        for worker_id in range(num_workers if start is None else start):
            if direct:
                self._fork_worker(worker_id)
            else:
                self._start_worker(worker_id)

    @property
    def factory_pid(self) -> int | None:
        """The running factory's pid (None after its death, until a worker is started)."""
        return self._factory.pid if self._factory is not None else None

    def _start_factory(self) -> None:
        spec, method = self._spec, self._method
        self._control, child = self._ctx.Pipe(duplex=True)
        kwargs = {"parent_end": self._control} if method == "fork" else {}
        factory = self._ctx.Process(
            target=_factory.factory_main,
            args=(child, self.num_workers, self._base_seed, spec),
            kwargs=kwargs,
            name="nostall-factory",
            daemon=False,  # it forks the workers; daemonic processes may not have children
        )
        try:
            factory.start()  # spawn/forkserver pickle the spec here
        except Exception:
            child.close()
            self._control.close()
            _pickling.check_picklable(  # name the culprit, if pickling was the problem
                method, dataset=spec.dataset, collate_fn=spec.collate_fn, worker_init_fn=spec.worker_init_fn
            )
            raise
        child.close()
        self._factory = factory
        self._answered = False  # this factory has not said anything yet
        # Its workers inherit its end of the control pipe, so a dead factory's pipe stays
        # open while one of them lingers; a pidfd says when the process itself is gone.
        self._factory_fd = _pidfd(factory.pid)

    @property
    def foreign(self) -> bool:
        """True in a forked child of the process that made this pool (see ``disown``)."""
        return os.getpid() != self.owner_pid

    def disown(self) -> None:
        """In a forked child: close this process's copies of the pipes, and nothing else.
        The factory is not this process's child: multiprocessing's exit handler would
        otherwise try to join it and fail ("can only join a child process")."""
        for conn in [*self._conns.values(), self._control]:
            if conn is not None:
                conn.close()
        for proc in [self._factory, *self._direct.values(), *self._retired]:
            multiprocessing.process._children.discard(proc)  # noqa: SLF001 (see above)

    def add(self, worker_id: int) -> None:
        """Start one more worker (num_workers="auto")."""
        self._start_worker(worker_id)

    def _fork_worker(self, worker_id: int) -> None:
        """Fork worker ``worker_id`` straight from this process (see ``FORK_FIRST_WORKERS``)."""
        mine, theirs = connection.Pipe(duplex=True)
        # In _conns before the fork: the child's fork hook closes its copy of our end.
        self._conns[worker_id] = mine
        self._worker_of[mine] = worker_id
        proc = self._ctx.Process(
            target=_factory.direct_worker_main,
            args=(theirs, worker_id, self.num_workers, self._base_seed, self._spec),
            name=f"nostall-worker-{worker_id}",
            daemon=True,
        )
        try:
            proc.start()
        finally:
            theirs.close()
        self._direct[worker_id] = proc
        self.pids[worker_id] = proc.pid

    def _reap_direct(self, worker_id: int, timeout: float) -> WorkerExit:
        """Reap a worker forked from this process whose pipe ended, with its exit status."""
        proc = self._direct.pop(worker_id)
        proc.join(timeout)
        if proc.exitcode is None:  # its pipe closed but it lingers: reaped in close()
            self._retired.append(proc)
            return WorkerExit(worker_id, proc.pid, None)
        if proc.exitcode < 0:  # killed: it may have been making a shared tensor
            _limits.remove_stranded_shm(proc.pid)
        exit = WorkerExit(worker_id, proc.pid, proc.exitcode)
        proc.close()
        return exit

    def _start_worker(self, worker_id: int) -> None:
        proc = self._direct.pop(worker_id, None)
        if proc is not None:  # replaced before its end was seen: reap it in close()
            self._retired.append(proc)
        if self._factory is None:
            self._start_factory()  # the last one died; its workers were reported as died
        mine, theirs = connection.Pipe(duplex=True)
        self._conns[worker_id] = mine
        self._worker_of[mine] = worker_id
        try:
            self._control.send(("start", worker_id))
            reduction.send_handle(self._control, theirs.fileno(), self._factory.pid)
        except OSError:
            pass  # the factory just died: poll() reads the end of its pipe and reports this worker
        finally:
            theirs.close()

    def submit(self, worker_id: int, msg) -> None:
        """Send one message (``_protocol``) to one worker."""
        conn = self._conns.get(worker_id)
        if conn is None:
            return  # gone and reported; restart() gives the id a new worker
        try:
            conn.send(msg)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the worker is gone; poll() reports it with its exit status

    def poll(self, timeout: float | None) -> list:
        """Wait up to ``timeout`` seconds for messages; return the ``(worker_id, message)``
        pairs arrived. ``blocked`` is how long it waited for the first one (not reading it)."""
        started = time.monotonic()
        ready = connection.wait([*self._conns.values(), *self._factory_watch()], 0 if self._lost else timeout)
        self.blocked = time.monotonic() - started
        self.poll_progressed = bool(ready)
        out = []
        # Results first: a worker's last batches are still worth taking if its factory died.
        for conn in sorted(ready, key=lambda c: not isinstance(c, connection.Connection) or c is self._control):
            if conn is self._control or (isinstance(conn, int) and conn == self._factory_fd):
                self._read_control()
                continue
            worker_id = self._worker_of.get(conn)
            if worker_id is None:
                continue  # dropped while reading this round: it died with its factory
            try:
                data = conn.recv_bytes()
            except (EOFError, OSError):
                exit = self._exit_of(worker_id)
                if worker_id in self._conns:  # else it is in self._lost: its factory died
                    out.append((worker_id, WorkerDied(worker_id, exit)))
                    self._drop(worker_id)
                continue
            out.append((worker_id, _transport.loads(data)))
        if self._lost:
            out.extend(self._lost)
            self._lost = []
            self.poll_progressed = True
        return out

    def _factory_watch(self) -> list:
        if self._factory is None:
            return []
        return [self._control] if self._factory_fd is None else [self._control, self._factory_fd]

    def _read_control(self, timeout: float = 0.0) -> bool:
        """Handle one message from the factory, or its death; False if nothing came."""
        if self._factory is None or not connection.wait(self._factory_watch(), timeout):
            return False
        if not self._control.poll():  # only the pidfd: the factory is gone, its pipe is not closed
            self._factory_died()
            return True
        try:
            msg = self._control.recv()
        except (EOFError, OSError):
            self._factory_died()
            return True
        self._handle(msg)
        return True

    def _handle(self, msg) -> None:
        self._answered = True
        if msg[0] == "started":
            self.pids[msg[1]] = msg[2]
        elif msg[0] == "exited":
            self.exits[msg[1]] = WorkerExit(msg[1], msg[2], msg[3])

    def _factory_died(self) -> None:
        """The factory is gone (its pidfd is readable, or its end of the control pipe
        closed), and so are its workers (``_factory.die_with_parent``). Raise if it never
        started; otherwise report every worker as died and start a new factory with
        the next worker. Workers forked from this process are not the factory's: they live on."""
        factory, self._factory = self._factory, None
        self._close_factory_fd()
        try:  # what it said before it died (the pids of the workers it started)
            while self._control.poll():
                self._handle(self._control.recv())
        except (EOFError, OSError):
            pass
        factory.join(5.0)  # reap it now: no zombie, and its exit code for the report
        if not self._answered and (factory.exitcode is None or factory.exitcode >= 0):
            # It ended by itself before saying anything: a new one would end the same way.
            self._control.close()
            unguarded = _diagnose.unguarded_main_lines() if self._method != "fork" else None
            if unguarded:
                raise RuntimeError(
                    f"the nostall worker factory (pid {factory.pid}) could not start under "
                    f"{self._method}: it imports the main script again, and {unguarded}, outside "
                    "`if __name__ == \"__main__\":`. " + _diagnose.GUARD_FIX
                ) from None
            raise RuntimeError(
                f"the nostall worker factory (pid {factory.pid}) ended unexpectedly "
                f"with exit code {factory.exitcode} before it started any worker. This usually "
                "means the dataset could not be unpickled in a fresh interpreter, or, under "
                "spawn/forkserver, the script lacks an `if __name__ == \"__main__\":` guard "
                "(see the error printed above)."
            ) from None
        lost = FactoryExit(len(self.factory_exits) + 1, factory.pid, factory.exitcode)
        self.factory_exits.append(lost)
        self._control.close()
        if factory.exitcode is not None:
            factory.close()
        pids = []
        for worker_id in sorted(w for w in self._conns if w not in self._direct):
            pid = self.pids.get(worker_id)
            pids.append(pid)
            self._lost.append((worker_id, WorkerDied(worker_id, WorkerExit(
                worker_id, pid, -signal.SIGKILL, lost))))  # the kernel's SIGKILL (PR_SET_PDEATHSIG)
            self._drop(worker_id)  # closing its pipe ends it even where PDEATHSIG does not exist
        _remove_stranded_shm_when_gone(pids)

    def _close_factory_fd(self) -> None:
        if self._factory_fd is not None:
            os.close(self._factory_fd)
            self._factory_fd = None

    def _exit_of(self, worker_id: int) -> WorkerExit:
        # The factory reports the exit status just after the pipe closes; wait briefly.
        # If the factory itself is gone, reading its pipe reports the worker with it.
        if worker_id in self._direct:  # this process's child: reap it here
            return self._reap_direct(worker_id, 1.0)
        deadline = time.monotonic() + 1.0
        while (worker_id in self._conns and self._factory is not None and not self._exit_known(worker_id)
               and time.monotonic() < deadline):
            self._read_control(timeout=0.05)
        if self._exit_known(worker_id):
            return self.exits.pop(worker_id)
        return WorkerExit(worker_id, self.pids.get(worker_id), None)

    def _exit_known(self, worker_id: int) -> bool:
        # The exit of this worker id's current process, not of one it replaced.
        exit, pid = self.exits.get(worker_id), self.pids.get(worker_id)
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
        while len(self.pids) < len(self._conns) and time.monotonic() < deadline and self._factory is not None:
            self._read_control(timeout=0.1)
        return {w: pid for w, pid in self.pids.items() if w in self._conns}

    def close(self) -> None:
        """End every worker and the factory; returns within about a second."""
        if self._closed:
            return
        self._closed = True
        if self.foreign:  # a forked child's copy: the workers and the factory are the parent's
            self.disown()
            self._conns.clear()
            self._worker_of.clear()
            return
        self._at_exit.cancel()
        for conn in self._conns.values():
            conn.close()  # workers see the end of their pipe and return; never blocks
        self._conns.clear()
        self._worker_of.clear()
        factory, self._factory = self._factory, None
        if factory is not None:
            self._close_factory_fd()
            try:
                self._control.send(("stop",))
            except OSError:
                pass
        self._end_direct()  # meanwhile the factory ends its own workers
        if factory is not None:
            factory.join(2.0)
            if factory.is_alive():
                factory.kill()
            factory.join(5.0)  # reaped: no zombie left (a SIGKILLed process ends at once)
            self._control.close()
            if factory.exitcode is not None:
                factory.close()

    def _end_direct(self) -> None:
        """End the workers forked from this process as the factory ends its own: they
        finish their batch (their pipe is closed), then a stuck one is killed."""
        procs = [*self._direct.values(), *self._retired]
        self._direct.clear()
        self._retired = []
        deadline = time.monotonic() + _factory._EXIT_GRACE_S  # noqa: SLF001 (the factory's grace, shared)
        for proc in procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in procs:
            if proc.is_alive():
                proc.kill()  # stuck in dataset code: it cannot finish by itself
        for proc in procs:
            proc.join(1.0)
            if proc.exitcode is not None:
                if proc.exitcode < 0:
                    _limits.remove_stranded_shm(proc.pid)  # killed: it may have been making a shared tensor
                proc.close()


def _pidfd(pid: int) -> int | None:
    """A descriptor that becomes readable when process ``pid`` ends (Linux 5.3+), or None."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _remove_stranded_shm_when_gone(pids: list, timeout: float = 2.0) -> None:
    """Remove the /dev/shm files that workers lost with their factory were still
    creating (the factory does it for the workers it reaps), once they have ended.
    They are not our children: wait on a pidfd for each, which works for any process."""
    pids = [p for p in pids if p is not None]
    fds = []
    for pid in pids:
        try:
            fds.append(os.pidfd_open(pid))
        except (AttributeError, OSError):  # ended already, or no pidfds (old kernel, not Linux)
            pass
    deadline = time.monotonic() + timeout
    try:
        waiting = list(fds)
        while waiting and time.monotonic() < deadline:
            ended = connection.wait(waiting, max(0.0, deadline - time.monotonic()))
            waiting = [fd for fd in waiting if fd not in ended]
    finally:
        for fd in fds:
            os.close(fd)
    for pid in pids:
        _limits.remove_stranded_shm(pid)


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

    uses_shm = False
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
        self.pids: dict = {}  # threads have no pid of their own
        self.exits: dict = {}  # and never die by themselves
        self._closed = False
        self.owner_pid = os.getpid()
        for worker_id in range(num_workers if start is None else start):
            self.add(worker_id)

    @property
    def foreign(self) -> bool:
        """True in a forked child: the worker threads exist only in the process that made them."""
        return os.getpid() != self.owner_pid

    def add(self, worker_id: int) -> None:
        """Start one more worker thread."""
        spec = thread_spec(self._spec, worker_id)
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
        """Send one message (``_protocol``) to one worker thread."""
        self._inboxes[worker_id].put(msg)

    def poll(self, timeout: float | None) -> list:
        """Wait up to ``timeout`` seconds for messages; return the ``(worker_id, message)`` pairs arrived."""
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
        """Threads have no pids: nothing to wait for."""
        return {}

    def restart(self, worker_id: int) -> None:
        """Refused: a thread never dies by itself and cannot be stopped (``can_restart`` is False)."""
        raise RuntimeError(f"nostall thread worker {worker_id} cannot be restarted: thread workers cannot be "
                           "stopped (ThreadPool.can_restart is False); use worker_type='process' to restart workers")

    def kill(self, worker_id: int) -> None:
        """Refused, as :meth:`restart`: a thread stuck in user code cannot be stopped."""
        raise RuntimeError(f"nostall thread worker {worker_id} cannot be killed: a thread stuck in user code cannot "
                           "be stopped (ThreadPool.can_restart is False); use worker_type='process' to stop workers")

    def stack(self, worker_id: int) -> str | None:
        """The worker thread's Python stack."""
        return _diagnose.thread_stack(self._threads[worker_id])

    def close(self) -> None:
        """Ask every thread to stop; a thread stuck in user code is left as a daemon."""
        if self._closed:
            return
        self._closed = True
        if self.foreign:
            return  # a forked child has no worker threads (fork copies only the calling thread)
        for inbox in self._inboxes.values():
            inbox.put(Stop())
        deadline = time.monotonic() + 1.0
        for thread in self._threads.values():
            thread.join(max(0.0, deadline - time.monotonic()))


def thread_spec(spec: _worker.WorkSpec, worker_id: int) -> _worker.WorkSpec:
    """The spec a worker thread runs: an iterable dataset gets a copy of its own (see
    ``_thread_copy``); a map-style dataset is shared by every thread."""
    if not spec.iterable:
        return spec
    return dataclasses.replace(spec, dataset=_thread_copy(spec.dataset, worker_id))


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
