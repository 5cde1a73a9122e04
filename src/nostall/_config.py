"""The loader's own settings: one frozen dataclass, validated in one place."""

from __future__ import annotations

from dataclasses import dataclass

WORKER_TYPES = ("process", "thread")
START_METHODS = ("fork", "spawn", "forkserver")


@dataclass(frozen=True)
class PoolConfig:
    """How batches are produced.

    ``window`` is the most batches in flight at once: submitted to a worker, being
    made, or made and waiting to be delivered in order. It is
    ``num_workers * prefetch_factor``, the same bound torch documents, and it also
    covers batches prepared ahead for the next epoch.
    """

    num_workers: int
    prefetch_factor: int
    persistent: bool
    worker_type: str
    start_method: str
    timeout: float
    in_order: bool
    pin_memory: bool

    def __post_init__(self):
        if self.worker_type not in WORKER_TYPES:
            raise ValueError(
                f"`worker_type` must be one of {', '.join(map(repr, WORKER_TYPES))}; "
                f"got {self.worker_type!r}. Use 'thread' for I/O-bound datasets that "
                "release the GIL, 'process' otherwise."
            )
        if self.start_method not in START_METHODS:
            raise ValueError(
                f"`multiprocessing_context` must use one of {', '.join(START_METHODS)}; "
                f"got {self.start_method!r}."
            )
        if self.num_workers < 0:
            raise ValueError(f"`num_workers` must be >= 0; got {self.num_workers}.")
        if self.prefetch_factor < 0:
            raise ValueError(f"`prefetch_factor` must be >= 0; got {self.prefetch_factor}.")

    @property
    def window(self) -> int:
        """Most batches in flight (at least 1, so prefetch_factor=0 still makes progress)."""
        return max(1, self.num_workers * self.prefetch_factor)
