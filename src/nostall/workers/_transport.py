"""Moving a batch from a worker process to the loader's process.

Small tensors travel by value inside the message (a memcpy, no file descriptor);
large tensors travel as shared memory through torch's own reductions (the worker's
``default_collate`` already built them in shared memory, so only a descriptor moves).
Handing a small batch to the main process through torch's queue costs more than
making it; inlining is what makes tiny samples cheap here.

A tensor is inlined by copying its whole storage (not only the bytes it views) and
rebuilt with its strides and offset; tensors sharing a storage share one copy, so
views of one another stay views, as with torch's shared-memory reductions.
Everything else (nested, sparse, quantized, conjugate-bit tensors, tensor
subclasses, tensors that require grad, other devices, storages above the inline
size) goes through ``ForkingPickler`` with the reductions ``torch.multiprocessing``
registers: exactly what torch's DataLoader sends.
"""

from __future__ import annotations

import ctypes
import io
import pickle
from multiprocessing.reduction import ForkingPickler

import torch
import torch.multiprocessing  # noqa: F401  (registers torch's shared-memory reductions)

# Below this a copy through the pipe beats passing a shared-memory descriptor.
INLINE_BYTES = 256 * 1024


def _rebuild_inline(raw: bytearray, dtype: torch.dtype, shape: tuple, stride: tuple, offset: int) -> torch.Tensor:
    if not raw:
        return torch.empty(shape, dtype=dtype)
    # ``raw`` is one object per storage (pickle's memo), so views rebuilt from it share memory.
    return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).as_strided(shape, stride, offset)


class _BatchPickler(ForkingPickler):
    """torch's shared-memory pickler, except that small tensors travel by value
    (all of them with ``inline_all``, when /dev/shm is too small)."""

    def __init__(self, file, protocol, inline_all: bool = False):
        super().__init__(file, protocol)
        self.inline_limit = float("inf") if inline_all else INLINE_BYTES
        self._copies: dict = {}  # (address, bytes) of a storage -> its copy in this message

    def reducer_override(self, obj):
        if type(obj) is not torch.Tensor or obj.device.type != "cpu":
            return NotImplemented  # subclasses, other devices: torch's reductions
        if (obj.requires_grad or obj.layout != torch.strided or obj.is_quantized or obj.is_nested
                or obj.is_conj() or obj.is_neg()):
            return NotImplemented  # torch's reductions know these; a raw copy would not
        storage = obj.untyped_storage()
        nbytes = storage.nbytes()
        if nbytes > self.inline_limit or nbytes % obj.element_size():
            return NotImplemented  # torch's reduction: a shared-memory descriptor
        key = (storage.data_ptr(), nbytes)
        raw = self._copies.get(key)
        if raw is None:
            # One memcpy of the storage; cheaper than any tensor-level copy for small tensors.
            raw = self._copies[key] = bytearray(ctypes.string_at(key[0], nbytes)) if nbytes else bytearray()
        return _rebuild_inline, (raw, obj.dtype, tuple(obj.shape), obj.stride(), obj.storage_offset())


def dumps(obj, inline_all: bool = False) -> memoryview:
    """Serialize a worker's message for the pipe (see module docstring): a view of the
    pickle's buffer, not a copy (``Connection.send_bytes`` takes it as it is)."""
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
