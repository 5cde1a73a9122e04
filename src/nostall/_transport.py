"""Moving a batch from a worker process to the loader's process.

Small tensors travel by value inside the message (a memcpy, no file descriptor);
large tensors travel as shared memory through torch's own reductions (the worker's
``default_collate`` already built them in shared memory, so only a descriptor moves).
Handing a small batch to the main process through torch's queue costs more than
making it; inlining is what makes tiny samples cheap here.
"""

from __future__ import annotations

import io
import pickle
from multiprocessing.reduction import ForkingPickler

import torch
import torch.multiprocessing  # noqa: F401  (registers torch's shared-memory reductions)

# Below this a copy through the pipe beats passing a shared-memory descriptor.
INLINE_BYTES = 256 * 1024


def _rebuild_inline(raw: bytearray, dtype: torch.dtype, shape: tuple) -> torch.Tensor:
    if not raw:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(shape)


class _BatchPickler(ForkingPickler):
    """torch's shared-memory pickler, except that small tensors travel by value
    (all of them with ``inline_all``, when /dev/shm is too small)."""

    def __init__(self, file, protocol, inline_all: bool = False):
        super().__init__(file, protocol)
        self.inline_limit = float("inf") if inline_all else INLINE_BYTES

    def reducer_override(self, obj):
        if type(obj) is not torch.Tensor or obj.device.type != "cpu":
            return NotImplemented
        if obj.requires_grad or obj.layout != torch.strided or obj.is_quantized:
            return NotImplemented
        if obj.numel() * obj.element_size() > self.inline_limit:
            return NotImplemented  # torch's reduction: a shared-memory descriptor
        flat = obj.detach().contiguous().reshape(-1).view(torch.uint8)
        return _rebuild_inline, (bytearray(flat.numpy().tobytes()), obj.dtype, tuple(obj.shape))


def dumps(obj, inline_all: bool = False) -> bytes:
    """Serialize a worker's message for the pipe (see module docstring)."""
    buf = io.BytesIO()
    _BatchPickler(buf, pickle.HIGHEST_PROTOCOL, inline_all).dump(obj)
    return buf.getbuffer()


def tensor_bytes(batch, above: int = 0) -> int:
    """Bytes of the tensors in ``batch`` larger than ``above`` bytes."""
    if isinstance(batch, torch.Tensor):
        size = batch.numel() * batch.element_size()
        return size if size > above else 0
    if isinstance(batch, dict):
        return sum(tensor_bytes(v, above) for v in batch.values())
    if isinstance(batch, (list, tuple)):
        return sum(tensor_bytes(v, above) for v in batch)
    return 0


def shared_bytes(batch) -> int:
    """Bytes of ``batch`` that travel through shared memory (tensors above the inline size)."""
    return tensor_bytes(batch, INLINE_BYTES)


def loads(data: bytes):
    """Inverse of :func:`dumps`, in the loader's process."""
    return pickle.loads(data)
