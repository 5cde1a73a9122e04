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
        import psutil

        self._psutil = psutil
        self.pid = os.getpid() if pid is None else pid
        self.interval_s = interval_s
        self.budget = budget
        self.metric = "pss" if _read_pss_kb(self.pid) is not None else "rss"
        self.peak_mb = 0.0
        self.last_mb = 0.0
        self.peak_processes = 0
        self.samples = 0
        self._root = psutil.Process(self.pid)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _tree(self) -> list[Any]:
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
                kb = _read_pss_kb(proc.pid)
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

    def _run(self) -> None:
        # Sampling must not slow what it measures, more so with many processes.
        wait = self.interval_s
        while not self._stop.wait(wait):
            started = time.perf_counter()
            self.sample()
            wait = max(self.interval_s, (time.perf_counter() - started) / self.budget)

    def start(self) -> ProcessTreeMemory:
        """Take a first sample and start sampling in a daemon thread."""
        self.sample()
        self._thread = threading.Thread(target=self._run, name="nostall-memory-sampler", daemon=True)
        self._thread.start()
        return self

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


