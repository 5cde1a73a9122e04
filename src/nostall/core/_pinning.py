"""Pinning off the training thread: batches are pinned in a thread of their own as
they arrive, so ``next()`` finds them pinned instead of pinning them itself.

Only batches already received (held in the engine's ready set, so counted in the
window) are pinned ahead; one pinned copy per such batch at most.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable


class Pinner:
    """Pins received batches in one background thread; :meth:`take` returns a
    batch pinned (waiting for its pin if it is still running, pinning it here if it
    was never started)."""

    def __init__(self, pin: Callable[[Any], Any], on_accelerator: bool = False):
        self._pin = pin
        self._on_accelerator = on_accelerator  # the thread uses the caller's current device
        self._executor: ThreadPoolExecutor | None = None  # started with the first batch
        self._pending: dict[int, Future] = {}  # task id -> the pinned batch

    def start(self, task_id: int, data) -> None:
        """Begin pinning the batch of task ``task_id``."""
        if self._executor is None:
            setup = _use_current_device() if self._on_accelerator else None
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="nostall-pin", initializer=setup)
        self._pending[task_id] = self._executor.submit(self._pin, data)

    def take(self, task_id: int, data):
        """The pinned batch of task ``task_id`` (an error from pinning raises here)."""
        pinned = self._pending.pop(task_id, None)
        return pinned.result() if pinned is not None else self._pin(data)

    def keep_only(self, task_ids) -> None:
        """Forget the batches that will not be delivered (a dropped epoch)."""
        for task_id in set(self._pending) - set(task_ids):
            self._pending.pop(task_id).cancel()

    def close(self) -> None:
        """Stop the thread; batches not taken are dropped."""
        self._pending.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None


def _use_current_device() -> Callable[[], None]:
    """A thread's current device is its own: without this the pin thread would use
    device 0 (and make a context there) while the loop runs on another, as torch's
    pin-memory thread avoids by setting the device it was given."""
    import torch

    from ._torch_versions import has_accelerator_api

    if has_accelerator_api():
        index = torch.accelerator.current_device_index()
        return lambda: torch.accelerator.set_device_index(index)
    index = torch.cuda.current_device()
    return lambda: torch.cuda.set_device(index)
