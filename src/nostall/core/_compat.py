"""Stand-ins for torch private iterator internals that code written for torch reads.

torch's own tests and some tools reach into ``iter(loader)._workers`` (a list of
``multiprocessing.Process``) to find worker pids or to check that workers exit.
nostall's worker processes are forked from a factory process, so they are not
children of the loader's process; :class:`WorkerProcess` answers the same questions
through psutil. Nothing here is on the per-batch path: it is built on first access.
"""

from __future__ import annotations

import psutil


class WorkerProcess:
    """One nostall worker process, with the parts of ``multiprocessing.Process`` that
    code written for torch uses: ``pid``, ``is_alive()``, ``join()``, ``exitcode``,
    ``terminate()``, ``kill()``.

    ``exitcode`` is the status the worker factory reported when the worker died while
    the loader ran (negative for a signal, as in multiprocessing); a worker that is gone
    without such a report was ended by nostall closing the loader and reads ``0``.
    """

    def __init__(self, worker_id: int, pid: int, exits: dict):
        self.worker_id = worker_id
        self.pid = pid
        self._exits = exits  # the pool's record of reported exits (kept current by the pool)
        try:
            self._proc: psutil.Process | None = psutil.Process(pid)  # remembers the start time: no pid reuse
        except psutil.NoSuchProcess:
            self._proc = None

    def is_alive(self) -> bool:
        """True while the worker process runs (a zombie counts as ended)."""
        if self._proc is None:
            return False
        try:
            return self._proc.is_running() and self._proc.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    def join(self, timeout: float | None = None) -> None:
        """Wait until the worker process has ended, or ``timeout`` seconds."""
        if self._proc is None:
            return
        try:
            self._proc.wait(timeout)
        except psutil.Error:  # timed out, gone, or not our child (a zombie left to the factory)
            pass

    @property
    def exitcode(self) -> int | None:
        """None while running; see the class docstring once ended."""
        if self.is_alive():
            return None
        reported = self._exits.get(self.worker_id)
        if reported is not None and reported.pid == self.pid and reported.exitcode is not None:
            return reported.exitcode
        return 0

    def terminate(self) -> None:
        """SIGTERM the worker (nostall restarts a worker that dies while the loader runs)."""
        self._signal("terminate")

    def kill(self) -> None:
        """SIGKILL the worker."""
        self._signal("kill")

    def _signal(self, how: str) -> None:
        if self._proc is not None:
            try:
                getattr(self._proc, how)()
            except psutil.NoSuchProcess:
                pass

    def __repr__(self) -> str:
        state = "alive" if self.is_alive() else f"exitcode={self.exitcode}"
        return f"<nostall WorkerProcess worker_id={self.worker_id} pid={self.pid} {state}>"


def worker_processes(engine) -> list:
    """``iter(loader)._workers`` for nostall: one :class:`WorkerProcess` per running
    process worker, by worker id (empty for thread workers and ``num_workers=0``)."""
    pool = getattr(engine, "pool", None)
    if pool is None:
        return []
    engine.check_owner()  # a forked child must not read the parent's factory pipe
    pids = pool.wait_started()
    exits = pool.exits
    return [WorkerProcess(worker_id, pid, exits) for worker_id, pid in sorted(pids.items())]
