"""Whether batches still go through /dev/shm, or only through the pipes.

After the first batch, ``TransportPolicy.check`` asks whether the batches in flight
fit in /dev/shm; a worker that found /dev/shm full, or died of SIGBUS writing to
it, makes every worker send whole batches through its pipe from then on (see
``_transport``): slower for large batches, but no crash.
"""

from __future__ import annotations

import warnings

from . import _limits, _transport
from ._protocol import PipeOnly


class TransportPolicy:
    """One loader's choice between shared memory and pipes (see the module docstring)."""

    def __init__(self):
        self.pipe_only: str | None = None  # why batches no longer go through /dev/shm
        self.checked = False  # the first batch's size was checked against /dev/shm

    def check(self, batch, window: int, pool, workers) -> None:
        """After the first batch: would the batches in flight fit in /dev/shm?"""
        self.checked = True
        per_batch = _transport.shared_bytes(batch)
        free = _limits.shm_free_bytes()
        if not per_batch or free is None:
            return
        need = per_batch * (window + 2)  # in flight, plus the loop's and the next
        if need > free:
            self.go_pipe_only(f"/dev/shm has {free / 2**20:,.1f} MB free, and the {window} "
                              f"batches in flight need about {need / 2**20:,.1f} MB "
                              f"({per_batch / 2**20:,.1f} MB each)", pool, workers)

    @staticmethod
    def shm_text() -> str:
        """``"12.0 MB free of 64 MB"``: /dev/shm now."""
        free, size = _limits.shm_free_bytes() or 0, _limits.shm_size_bytes() or 0
        return f"{free / 2**20:,.1f} MB free of {size / 2**20:,.0f} MB"

    def go_pipe_only(self, why: str, pool, workers) -> None:
        """Send whole batches through the pipes from now on: slower for large batches,
        but a full /dev/shm can no longer kill workers with SIGBUS. Tells ``workers`` of ``pool``."""
        if self.pipe_only:
            return
        self.pipe_only = why
        warnings.warn(
            f"{why}. nostall now copies batches through its pipes instead of shared memory (slower "
            "for large batches, no crash). To use shared memory again, give /dev/shm more room "
            "(e.g. `docker run --shm-size=2g`) or lower batch_size or prefetch_factor.",
            RuntimeWarning,
            stacklevel=3,
        )
        for w in list(workers):
            pool.submit(w, PipeOnly(why))

    def tell(self, pool, worker_id: int) -> None:
        """A new worker process: send it pipe-only mode if that is on."""
        if self.pipe_only:
            pool.submit(worker_id, PipeOnly(self.pipe_only))
