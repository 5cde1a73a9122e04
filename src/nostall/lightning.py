"""nostall for PyTorch Lightning: :class:`DataStallCallback` puts the data-stall
figures in the trainer's loggers (TensorBoard, CSV, W&B, ...) and warns once when
training waits for data.

Importing this module imports ``lightning`` (or, failing that, ``pytorch_lightning``);
``import nostall`` alone does not.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # the older package name
    try:
        from pytorch_lightning.callbacks import Callback
    except ImportError as exc:
        raise ImportError(
            "nostall.lightning needs PyTorch Lightning: `pip install lightning`."
        ) from exc

__all__ = ["DataStallCallback", "stall_advice"]

_clock = time.monotonic


def stall_advice(figures: dict[str, float], nostall_loader: bool, prefix: str = "nostall/") -> str:
    """What to do about a loop that waits for data, from :meth:`LoaderStats.scalars` figures."""
    if not nostall_loader:
        return ("Measure it with nostall.DataLoader (same arguments as torch's; "
                "num_workers=\"auto\" sizes the workers), and run `nostall doctor` to check the machine.")
    busy = figures.get(prefix + "workers_busy")
    workers = figures.get(prefix + "num_workers", 0.0)
    if not workers:
        return ("The batches are made on the training thread (num_workers=0): set num_workers=\"auto\" "
                "or a number of workers; `nostall doctor` checks the machine.")
    if busy is not None and busy > 0.9:
        return (f"The {workers:.0f} workers are busy {busy:.0%} of the time: the dataset's __getitem__ or "
                "collate_fn is the bottleneck; add workers (num_workers=\"auto\") if CPUs are free, or make "
                "a sample cheaper (`nostall doctor --dataset MODULE:FACTORY` measures one batch).")
    return ("The workers are idle part of the time: raise prefetch_factor (or prefetch_factor=\"auto\"), "
            "and run `nostall doctor` to check /dev/shm, CPUs and limits.")


class DataStallCallback(Callback):
    """Log the data-stall figures every ``every_n_steps`` training steps and warn once when
    the loop waits for data more than ``warn_above`` (0 to 1) of its time.

    With a ``nostall.DataLoader`` the figures are ``loader.stats.scalars()`` (wait fraction,
    batches/s, samples/s, workers busy, batches in flight, restarts, skipped samples,
    workers; each over the steps since the previous log). With torch's DataLoader (or
    any other) the callback times the gap between one ``on_train_batch_end`` and the next
    ``on_train_batch_start`` (the time to fetch a batch) against the step, and logs
    ``nostall/wait_fraction`` only. Figures go to every logger of the trainer
    (``trainer.loggers``) at the trainer's global step, whatever ``log_every_n_steps`` is.
    """

    def __init__(self, every_n_steps: int = 50, warn_above: float | None = 0.2, prefix: str = "nostall/") -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"`every_n_steps` must be an int >= 1; got {every_n_steps!r}.")
        if warn_above is not None and not 0 <= warn_above <= 1:
            raise ValueError(f"`warn_above` must be between 0 and 1 (a fraction of the time) or None; "
                             f"got {warn_above!r}.")
        self.every_n_steps = every_n_steps
        self.warn_above = warn_above
        self.prefix = prefix
        self.last: dict[str, float] = {}  # the figures logged last
        self._warned = False
        self._mark: float | None = None  # when the last batch ended (or the epoch started)
        self._wait = self._step = 0.0
        self._started: float | None = None
        self._steps = 0

    @staticmethod
    def _stats(trainer: Any):
        loader = getattr(trainer, "train_dataloader", None)
        stats = getattr(loader, "stats", None)
        return stats if hasattr(stats, "scalars") else None

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        """Start timing the fetch of the epoch's first batch (it includes starting the workers)."""
        self._mark = _clock()

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        """The batch arrived: the time since the previous batch ended was spent waiting for it."""
        now = _clock()
        if self._mark is not None:
            self._wait += now - self._mark
        self._started = now

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Count the step; every ``every_n_steps`` steps log the figures and check the threshold."""
        now = _clock()
        if self._started is not None:
            self._step += now - self._started
        self._mark = now
        self._steps += 1
        if self._steps % self.every_n_steps:
            return
        stats = self._stats(trainer)
        if stats is not None:
            figures = stats.scalars(self.prefix)
        else:
            total = self._wait + self._step
            figures = {self.prefix + "wait_fraction": self._wait / total} if total > 0 else {}
        self._wait = self._step = 0.0
        if not figures:
            return
        self.last = figures
        for logger in trainer.loggers:
            logger.log_metrics(figures, step=trainer.global_step)
        waiting = figures.get(self.prefix + "wait_fraction", 0.0)
        if self.warn_above is not None and waiting > self.warn_above and not self._warned:
            self._warned = True
            warnings.warn(
                f"nostall: the training loop waited for data {waiting:.0%} of its time over the last "
                f"{self.every_n_steps} steps (threshold {self.warn_above:.0%}). "
                + stall_advice(figures, stats is not None, self.prefix),
                stacklevel=2,
            )
