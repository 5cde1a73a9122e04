"""Memory of a process tree: PSS summed over a process and all its descendants.

PSS splits shared pages between the processes sharing them, so forked workers
are not counted several times (RSS would count the parent's pages once per
worker). Used by ``loader.stats``, ``nostall.watch`` and the benchmarks.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

_MB = 1024.0 * 1024.0


def _children_file(pid: int, tid: str) -> str:
    return f"/proc/{pid}/task/{tid}/children"


def proc_descendants(pid: int) -> list[int] | None:
    """Pids of every descendant of ``pid``, from ``/proc/<pid>/task/*/children``
    (a few small reads; psutil's ``children(recursive=True)`` reads every process
    on the machine). None where the kernel does not provide those files."""
    out: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue  # gone meanwhile
        for tid in tasks:
            try:
                with open(_children_file(parent, tid), "rb") as fh:
                    kids = [int(k) for k in fh.read().split()]
            except FileNotFoundError:
                if not os.path.exists(_children_file(os.getpid(), str(os.getpid()))):
                    return None  # no CONFIG_PROC_CHILDREN
                continue
            except (OSError, ValueError):
                continue
            out.extend(kids)
            todo.extend(kids)
    return out


def _read_pss_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as fh:
            for line in fh:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


class ProcessTreeMemory:
    """Samples the memory of a process and all its descendants in a thread.

    ``peak_mb`` is the largest sum seen, ``metric`` is ``"pss"`` or ``"rss"``
    (when ``/proc/<pid>/smaps_rollup`` cannot be read, e.g. not Linux or an
    old kernel). One sample costs about 1-3 ms per torch process; the thread
    sleeps at least ``interval_s`` and long enough that sampling stays under
    ``budget`` of one core (2% by default). Use as a context manager or with
    ``start()`` / ``stop()``; ``sample()`` takes one sample now.
    """

    def __init__(self, pid: int | None = None, interval_s: float = 0.05, budget: float = 0.02) -> None:
        self.pid = os.getpid() if pid is None else pid
        self.interval_s = interval_s
        self.budget = budget
        # Whether PSS is readable, without reading it: a read walks the whole address space.
        self.metric = "pss" if os.access(f"/proc/{self.pid}/smaps_rollup", os.R_OK) else "rss"
        self._psutil = None  # imported only where /proc cannot answer (not Linux, RSS)
        if self.metric == "rss" or proc_descendants(self.pid) is None:
            import psutil

            self._psutil = psutil
        self.peak_mb = 0.0
        self.last_mb = 0.0
        self.peak_processes = 0
        self.samples = 0
        self._root = self._psutil.Process(self.pid) if self._psutil is not None else None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _tree(self) -> list[Any]:
        """The processes to count: pids (from /proc) or psutil processes."""
        if self._psutil is None:
            kids = proc_descendants(self.pid)
            return [self.pid, *(kids or ())]
        try:
            return [self._root, *self._root.children(recursive=True)]
        except self._psutil.Error:
            return []

    def sample(self) -> float:
        """Take one sample; return the tree's memory in MiB."""
        total_bytes = 0
        procs = self._tree()
        for proc in procs:
            if self.metric == "pss":
                kb = _read_pss_kb(proc if isinstance(proc, int) else proc.pid)
                if kb is not None:
                    total_bytes += kb * 1024
            else:
                try:
                    total_bytes += proc.memory_info().rss
                except self._psutil.Error:
                    pass
        mb = total_bytes / _MB
        with self._lock:
            self.samples += 1
            self.last_mb = mb
            if mb > self.peak_mb:
                self.peak_mb = mb
            if len(procs) > self.peak_processes:
                self.peak_processes = len(procs)
        return mb

    def _run(self, delay_s: float) -> None:
        # Sampling must not slow what it measures, more so with many processes.
        wait = delay_s if delay_s > 0 else self.interval_s
        while not self._stop.wait(wait):
            started = time.perf_counter()
            self.sample()
            wait = max(self.interval_s, (time.perf_counter() - started) / self.budget)

    def start(self, delay_s: float = 0.0) -> ProcessTreeMemory:
        """Take a first sample and start sampling in a daemon thread; with ``delay_s``,
        take no sample now and the first one in the thread after ``delay_s`` seconds
        (a loader's start: one sample of a large process costs tens of milliseconds and
        holds its address space, which forking workers needs)."""
        if delay_s <= 0:
            self.sample()
        self._thread = threading.Thread(target=self._run, args=(delay_s,), name="nostall-memory-sampler",
                                        daemon=True)
        self._thread.start()
        return self

    @property
    def stopped(self) -> bool:
        """True once :meth:`stop` was called."""
        return self._stop.is_set()

    def stop(self) -> float:
        """Stop the thread, take a last sample, return the peak (MiB)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()
        return self.peak_mb

    def __enter__(self) -> ProcessTreeMemory:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


