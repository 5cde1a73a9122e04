"""Batches already on the device: ``nostall.to_device(loader, "cuda", prefetch=2)``.

The copy of batch k+1 to the GPU runs on a side CUDA stream while the model works on
batch k; the training loop only waits when a copy has not finished. Resume stays
exact: the loader's state is taken before each batch is taken ahead, so
``state_dict()`` describes what the loop has consumed, not what was copied ahead.
"""

from __future__ import annotations

import collections
import time

import torch
from torch.utils._pytree import tree_flatten, tree_map_only
from torch.utils.data._utils.pin_memory import pin_memory as _pin

from .._options import is_int


def to_device(loader, device="cuda", prefetch: int = 2) -> DeviceLoader:
    """Wrap ``loader`` (nostall's or torch's) so that its batches arrive on ``device``.

    On CUDA, up to ``prefetch`` batches are copied ahead on a side stream with
    ``non_blocking=True`` (pass ``pin_memory=True`` to the loader so the copies are
    asynchronous; unpinned batches are pinned here first). ``device="cpu"`` keeps
    batches where they are (CPU tensors are not copied).
    """
    return DeviceLoader(loader, device, prefetch)


def _check_device(device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"to_device(device={device!r}): not a torch device ({exc}); "
                         "pass e.g. 'cuda', 'cuda:1' or 'cpu'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"to_device(device={device!r}): torch.cuda.is_available() is False here "
                           "(no CUDA device, or a CPU-only torch build); pass device='cpu' to keep "
                           "batches in host memory, or run on a machine with a GPU")
    return dev


class DeviceLoader:
    """An iterable over a loader's batches on ``device`` (see :func:`to_device`).

    Everything else (``len()``, ``set_epoch`` through the sampler, ``stats``,
    ``close()``) is the wrapped loader's. ``copy_seconds`` is the time the training
    thread spent starting copies (and pinning unpinned batches); ``wait_seconds`` the
    time it waited for a copy to finish. A nostall loader's ``stats.device`` (and
    ``stats.scalars()``, ``str(stats)``) reports them too, per batch handed over.
    """

    def __init__(self, loader, device="cuda", prefetch: int = 2):
        if not is_int(prefetch) or prefetch < 1:
            raise ValueError(f"to_device(prefetch={prefetch!r}): expected an int >= 1 "
                             "(the number of batches copied ahead of the loop)")
        self.loader = loader
        self.device = _check_device(device)
        self.prefetch = prefetch
        self.copy_seconds = 0.0
        self.wait_seconds = 0.0
        self._state = None  # the loader's state before the oldest batch still ahead was taken
        # nostall's loaders (and nostall.watch) report the hand-off in loader.stats too.
        stats = getattr(loader, "stats", None)
        self._recorder = getattr(stats, "_rec", None)

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name):
        if name == "loader":  # not set yet (copying, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __enter__(self) -> DeviceLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the wrapped loader (if it can be closed)."""
        close = getattr(self.loader, "close", None)
        if close is not None:
            close()

    def state_dict(self) -> dict:
        """The loader's state after the last batch the loop received (batches copied
        ahead are made again after a resume)."""
        return self._state if self._state is not None else self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Restore the wrapped loader's state (see :meth:`state_dict`)."""
        self._state = None
        self.loader.load_state_dict(state)

    def __iter__(self):
        self._state = None
        stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        stateful = callable(getattr(self.loader, "state_dict", None))
        ahead: collections.deque = collections.deque()
        it = iter(self.loader)

        def take() -> bool:
            state = self.loader.state_dict() if stateful else None
            try:
                batch = next(it)
            except StopIteration:
                return False
            started = time.perf_counter()
            ahead.append((state, *self._copy(batch, stream), time.perf_counter() - started))
            self.copy_seconds += ahead[-1][-1]
            return True

        while len(ahead) < self.prefetch and take():
            pass
        while ahead:
            _, batch, done, copy_s = ahead.popleft()
            take()  # the next copy starts before the loop gets this batch
            wait_s = 0.0
            if done is not None:
                started = time.perf_counter()
                current = torch.cuda.current_stream(self.device)
                current.wait_event(done)
                for t in tree_flatten(batch)[0]:
                    if isinstance(t, torch.Tensor):
                        t.record_stream(current)  # not freed for reuse while the loop's stream uses it
                wait_s = time.perf_counter() - started
                self.wait_seconds += wait_s
            if self._recorder is not None:
                self._recorder.device_copied(copy_s, wait_s)
            self._state = ahead[0][0] if ahead else None
            yield batch

    def _copy(self, batch, stream):
        if stream is None:
            return tree_map_only(torch.Tensor, lambda t: t.to(self.device), batch), None
        if any(isinstance(t, torch.Tensor) and not t.is_pinned() for t in tree_flatten(batch)[0]):
            batch = _pin(batch, "cuda")  # a copy from pageable memory would not be asynchronous
        with torch.cuda.stream(stream):
            moved = tree_map_only(torch.Tensor, lambda t: t.to(self.device, non_blocking=True), batch)
        done = torch.cuda.Event()
        done.record(stream)
        return moved, done
