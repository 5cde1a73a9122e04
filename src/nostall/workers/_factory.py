"""The worker factory: one process that holds the dataset and forks workers from it.

Under ``spawn`` and ``forkserver`` the loader starts one fresh interpreter, sends it
the dataset, collate_fn and worker_init_fn once, and that process forks every worker.
Workers therefore start in milliseconds, in parallel, without importing torch or
unpickling the dataset again; the factory itself is single-threaded, so forking it is
as safe as a forkserver. Under ``fork`` the first workers are forked straight from the
loader's process, as torch's are (one fork, not two, before the first batch), and the
factory, a fork of the loader's process (nothing is serialized at all), is started when
a worker has to be replaced or added. The factory stays alive to replace or add workers.

Protocol on the control pipe (loader -> factory): ``("start", worker_id)`` followed by
the worker's pipe end as a passed file descriptor; ``("stop",)`` to end. The factory
answers ``("started", worker_id, pid)`` and ``("exited", worker_id, pid, exitcode)``.
"""

from __future__ import annotations

import ctypes
import gc
import multiprocessing
import os
import signal
import time
from multiprocessing import connection, reduction

from . import _limits, _procname, _worker

_PR_SET_PDEATHSIG = 1
_EXIT_GRACE_S = 0.5  # how long workers get to finish their batch when the loader closes


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (no orphans)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the pipe EOF still ends workers
        return
    # A parent that died before the prctl sends nothing: we would outlive it, holding its
    # pipes open (the loader then could not tell it is gone). Do what the kernel would have.
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:
        os.kill(os.getpid(), signal.SIGKILL)


def _worker_entry(fd: int, worker_id: int, num_workers: int, base_seed: int, spec) -> None:
    die_with_parent()
    _procname.set_process_name(*_procname.worker_names(worker_id))  # for ps, top, OOM reports
    conn = connection.Connection(fd)
    _worker.process_main(conn, worker_id, num_workers, base_seed, spec)


def direct_worker_main(conn, worker_id: int, num_workers: int, base_seed: int, spec) -> None:
    """Body of a worker forked straight from the loader's process (``fork``: the first
    workers, see ``_pool.ProcessPool``). Set up as a factory-made worker is: it dies with
    the loader, names itself, and keeps the collector off the objects it inherited."""
    die_with_parent()  # the pool forks from the main thread only: PDEATHSIG follows the forking thread
    _procname.set_process_name(*_procname.worker_names(worker_id))
    gc.freeze()
    _worker.process_main(conn, worker_id, num_workers, base_seed, spec)


def factory_main(control, num_workers: int, base_seed: int, spec, parent_end=None) -> None:
    """Body of the factory process."""
    _procname.set_process_name("nostall-factory", "nostall-factory")  # for ps, top, OOM reports
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if parent_end is not None:  # under fork we inherited the loader's end; drop it
        parent_end.close()
    # Keep the collector off the objects we hold (and workers inherit): a collection
    # writes to every object it visits, turning shared pages into private copies.
    gc.freeze()
    fork = multiprocessing.get_context("fork")
    workers = {}  # sentinel -> (worker_id, process)
    try:
        while True:
            ready = connection.wait([control, *workers])
            for obj in ready:
                if obj is control:
                    try:
                        msg = control.recv()
                    except (EOFError, OSError):
                        return
                    if msg[0] == "stop":
                        return
                    worker_id = msg[1]
                    fd = reduction.recv_handle(control)
                    proc = fork.Process(
                        target=_worker_entry,
                        args=(fd, worker_id, num_workers, base_seed, spec),
                        name=f"nostall-worker-{worker_id}",
                        daemon=True,
                    )
                    proc.start()
                    os.close(fd)
                    workers[proc.sentinel] = (worker_id, proc)
                    control.send(("started", worker_id, proc.pid))
                else:
                    worker_id, proc = workers.pop(obj)
                    proc.join()
                    if proc.exitcode < 0:  # killed: it may have been making a shared tensor
                        _limits.remove_stranded_shm(proc.pid)
                    try:
                        control.send(("exited", worker_id, proc.pid, proc.exitcode))
                    except OSError:
                        return
    finally:
        # Workers end by themselves once their pipe is closed and their batch is done.
        # Killing one mid-batch could strand a shared-memory file torch was creating.
        deadline = time.monotonic() + _EXIT_GRACE_S
        for _, proc in workers.values():
            proc.join(max(0.0, deadline - time.monotonic()))
        for _, proc in workers.values():
            if proc.is_alive():
                proc.kill()  # stuck in dataset code: it cannot finish by itself
        for _, proc in workers.values():
            proc.join(1.0)
            if proc.exitcode is not None and proc.exitcode < 0:
                _limits.remove_stranded_shm(proc.pid)  # killed: it may have been making a shared tensor
