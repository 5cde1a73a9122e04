"""The loader's own settings: one frozen dataclass, validated in one place."""

from __future__ import annotations

from dataclasses import dataclass

WORKER_TYPES = ("process", "thread", "auto")
START_METHODS = ("fork", "spawn", "forkserver")
ON_HANG = ("restart", "raise")
ON_SAMPLE_ERROR = ("raise", "skip")


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

    def __post_init__(self):
        if self.worker_type not in WORKER_TYPES:
            raise ValueError(
                f"`worker_type` must be one of {', '.join(map(repr, WORKER_TYPES))}; "
                f"got {self.worker_type!r}. Use 'thread' for I/O-bound datasets that "
                "release the GIL, 'process' otherwise, 'auto' to let nostall choose."
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
        if isinstance(self.max_restarts, bool) or not isinstance(self.max_restarts, int) or self.max_restarts < 0:
            raise ValueError(f"`max_worker_restarts` must be an int >= 0; got {self.max_restarts!r}.")
        if self.hang_timeout is not None and not (
            isinstance(self.hang_timeout, (int, float)) and not isinstance(self.hang_timeout, bool)
            and self.hang_timeout > 0
        ):
            raise ValueError(
                f"`hang_timeout` must be None (automatic) or a number of seconds > 0; got {self.hang_timeout!r}."
            )
        if self.on_hang not in ON_HANG:
            raise ValueError(f"`on_hang` must be one of {', '.join(map(repr, ON_HANG))}; got {self.on_hang!r}.")
        if self.on_sample_error not in ON_SAMPLE_ERROR:
            raise ValueError(
                f"`on_sample_error` must be one of {', '.join(map(repr, ON_SAMPLE_ERROR))}; "
                f"got {self.on_sample_error!r}."
            )
        if self.max_inflight_bytes is not None and (
            isinstance(self.max_inflight_bytes, bool) or not isinstance(self.max_inflight_bytes, int)
            or self.max_inflight_bytes <= 0
        ):
            raise ValueError(
                f"`max_inflight_bytes` must be None or an int > 0 (bytes); got {self.max_inflight_bytes!r}."
            )
        if not (isinstance(self.max_skipped_fraction, (int, float)) and not isinstance(self.max_skipped_fraction, bool)
                and 0.0 <= self.max_skipped_fraction <= 1.0):
            raise ValueError(
                f"`max_skipped_fraction` must be a number from 0 to 1; got {self.max_skipped_fraction!r}."
            )
    def window_for(self, batch_bytes: int, workers: int | None = None, prefetch: int | None = None) -> int:
        """The window for ``workers`` active workers with ``prefetch`` (default: the
        configured ones), also bounded by ``max_inflight_bytes`` for batches of ``batch_bytes``."""
        workers = self.num_workers if workers is None else workers
        window = max(1, workers * (self.prefetch_factor if prefetch is None else prefetch))
        if self.max_inflight_bytes is None:
            return window
        if batch_bytes <= 0:
            return max(1, min(window, workers))
        return max(1, min(window, self.max_inflight_bytes // batch_bytes))

    @property
    def window(self) -> int:
        """Most batches in flight (at least 1, so prefetch_factor=0 still makes progress)."""
        return max(1, self.num_workers * self.prefetch_factor)
