"""The engine's settings, derived from a built loader whose arguments ``nostall._options`` checked."""

from __future__ import annotations

from dataclasses import dataclass

from ._options import check_start_method


@dataclass(frozen=True)
class PoolConfig:
    """How batches are produced.

    ``window`` is the most batches in flight at once: submitted to a worker, being
    made, or made and waiting to be delivered in order. It is
    ``num_workers * prefetch_factor``, the same bound torch documents, and it also
    covers batches prepared ahead for the next epoch.

    Supervision: a worker process that dies is replaced and its batches made again,
    as often as needed while batches keep being delivered (a dead worker factory too:
    one failure, however many workers died with it); the loader raises when a
    batch ended its worker twice (a poison batch) or after more than ``max_restarts``
    failures in a row with no batch delivered in between. A batch that takes longer
    than ``hang_timeout`` seconds (None: 20 times the median batch, at least 30 s)
    is reported with the worker's stack; then the worker is restarted or the
    loader raises (``on_hang``). A sample whose ``__getitem__`` raises is raised in
    the loop (``on_sample_error="raise"``) or left out of its batch ("skip"),
    while the epoch's skipped samples are at most ``max_skipped_fraction`` x its
    samples (floor: 0.01 of 64 samples allows none). They are counted as their
    batch is delivered, so every batch before the one that goes over the limit
    reaches the loop first. An epoch of unknown length (a batch sampler without
    ``len``) is counted against the samples read so far (at least 1,000) and, at
    its end, its total. Skipping needs a map-style dataset: an iterable dataset's
    iterator cannot go on after it raised, so its errors raise.

    ``max_inflight_bytes`` also bounds the window in bytes: once a batch's size is
    known, at most ``max_inflight_bytes // batch bytes`` batches are in flight (at
    least one); before that, one per worker.
    """

    num_workers: int
    prefetch_factor: int
    persistent: bool
    worker_type: str
    start_method: str
    timeout: float
    in_order: bool
    pin_memory: bool
    max_restarts: int = 3
    hang_timeout: float | None = None
    on_hang: str = "restart"
    on_sample_error: str = "raise"
    max_skipped_fraction: float = 0.01
    max_inflight_bytes: int | None = None
    auto_workers: bool = False  # num_workers="auto": num_workers is then the most the tuner may use
    auto_prefetch: bool = False  # prefetch_factor="auto"
    sync_dataset: bool = False  # attributes reassigned on the dataset reach process workers
    ray_actor_options: dict | None = None  # worker_type="ray": each actor's .options() (see _ray_pool)

    def __post_init__(self):
        # The user's arguments were checked by the loader (nostall._options); the start
        # method comes from a multiprocessing context, which may be a custom one.
        check_start_method(self.start_method)

    def window_for(self, batch_bytes: int, workers: int | None = None, prefetch: int | None = None) -> int:
        """The window for ``workers`` active workers with ``prefetch`` (default: the
        configured ones), also bounded by ``max_inflight_bytes`` for batches of ``batch_bytes``."""
        workers = self.num_workers if workers is None else workers
        window = _by_count(workers, self.prefetch_factor if prefetch is None else prefetch)
        if self.max_inflight_bytes is None:
            return window
        if batch_bytes <= 0:
            return max(1, min(window, workers))
        return max(1, min(window, self.max_inflight_bytes // batch_bytes))

    @property
    def window(self) -> int:
        """Most batches in flight by count alone, for the configured workers and prefetch."""
        return _by_count(self.num_workers, self.prefetch_factor)


def _by_count(workers: int, prefetch: int) -> int:
    """``workers * prefetch`` batches in flight, at least 1 (so prefetch_factor=0 still makes progress)."""
    return max(1, workers * prefetch)
