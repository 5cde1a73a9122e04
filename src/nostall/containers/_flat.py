"""Flat containers for dataset metadata: no copy-on-read in workers, shared under spawn.

A list of a million paths is a million Python objects. A worker that reads one
updates its reference count, which writes to the memory page holding it, and the
kernel copies that page into the worker: over an epoch every worker ends up with
its own copy of the whole list (pytorch/pytorch#13246). Under spawn/forkserver
each of torch's workers unpickles a copy of its own from the start.

The containers here hold the same data in a few numpy buffers instead:

``StringArray``  str or bytes items: one byte buffer plus int64 offsets.
``NumberArray``  int, float or bool items (one numpy array), or rows of
                 equal-length numeric lists/tuples (a 2-D array).
``ObjectArray``  any picklable items: their pickles in one buffer plus offsets,
                 unpickled on each access (the fallback for odd columns).
``Records``      rows (dicts with the same keys, or tuples of one length) stored
                 column by column, each column one of the above.

``flat(obj)`` picks the container for a list or a dict of lists. Items come back
as fresh Python objects (``str``, ``int``, ``float``, ``bool``, ``list``, ``dict``)
equal to the originals; the containers are read-only.

Why this fixes the growth: a buffer is a single Python object, so reading an item
touches the buffer's header (one page), never the pages of the data, and forked
workers keep sharing the data with their parent whatever they read.

Sharing under spawn and forkserver. Both start methods pickle the dataset with
``multiprocessing.reduction.ForkingPickler`` (torch's DataLoader for every worker,
nostall once, for its worker factory). The containers register a reducer there
that moves each large buffer into a torch shared-memory storage (in place, once:
the parent's private copy is released) and sends it as a torch tensor, which
torch passes as a file descriptor. The receiving process maps the same pages, so
the data exist once however many processes read them. Why torch's storages and
not ``multiprocessing.shared_memory``: torch unlinks the segment from /dev/shm
as soon as it is created (the default ``file_descriptor`` sharing strategy), so
the kernel frees it when the last process holding it closes it or dies, even by
SIGKILL; nothing can leak in /dev/shm and no process has to unlink anything.
``SharedMemory`` segments are named files that someone must unlink, and on
Python < 3.13 every process that attaches one registers it with its resource
tracker, which unlinks it when that process exits, under the others' feet.
The segment does count against the size of /dev/shm while it lives (once, not
once per worker); when /dev/shm is too small the buffer is copied into the
pickle instead, with a warning.

Ordinary ``pickle.dumps`` (saving a dataset, ``copy.deepcopy``) writes the bytes
themselves: the result loads anywhere, needs no shared memory, and does not
change the container. Under fork nothing is pickled and nothing needs to happen.
"""

from __future__ import annotations

import operator
import pickle
import warnings
from collections.abc import Callable, Mapping, Sequence
from multiprocessing.reduction import ForkingPickler
from typing import Any, NoReturn

import numpy as np
import torch
import torch.multiprocessing  # (registers torch's shared-memory reductions)

__all__ = ["NumberArray", "ObjectArray", "Records", "StringArray", "flat"]

# Buffers smaller than this travel inside the pickle: a copy is cheaper than a
# shared-memory segment and a file descriptor.
SHARE_MIN_BYTES = 64 * 1024

_SUPPORTED = (
    "nostall.flat() takes a list of str, a list of bytes, a list of numbers (int, float or bool), "
    "a list of equal-length lists of numbers, a list of dicts with the same keys, a list of tuples "
    "of one length, or a dict of equal-length lists"
)


def _a(name: str) -> str:
    return f"an {name}" if name[:1].lower() in "aeiou" else f"a {name}"


def _a_value(value: Any) -> str:
    """``value`` with its type and an article, for error messages: "an int 3"."""
    text = repr(value)
    return f"{_a(type(value).__name__)} {text if len(text) <= 60 else text[:57] + '...'}"


def _mb(nbytes: int) -> str:
    return f"{nbytes / 1e6:.1f} MB"


def _misfit(items: Sequence, fits: Callable[[Any], bool], name: str, what: str, hint: str = "") -> NoReturn:
    """Raise a TypeError naming the first item of ``items`` that does not fit."""
    i = next((i for i, x in enumerate(items) if not fits(x)), 0)
    but = f", but {name}[0] is {_a(type(items[0]).__name__)}" if i else ""
    raise TypeError(f"{name}[{i}] is {_a_value(items[i])}{but}: {what}. {hint}".rstrip())


# --------------------------------------------------------------------------- #
# The base: buffers, pickling, sharing
# --------------------------------------------------------------------------- #


class _Flat(Sequence):
    """A read-only sequence backed by a few numpy buffers (see the module docstring).

    Subclasses define ``_meta()`` (small state besides the buffers),
    ``_buffers()`` and ``_set_buffers(arrays)`` (which also rebuilds any views).
    """

    _shared: tuple | None = None  # what ForkingPickler sends, once the buffers are shared

    def _meta(self) -> tuple:
        raise NotImplementedError

    def _buffers(self) -> tuple[np.ndarray, ...]:
        raise NotImplementedError

    def _set_buffers(self, arrays: tuple[np.ndarray, ...]) -> None:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        """Bytes held in the buffers."""
        return sum(a.nbytes for a in self._buffers())

    def __reduce__(self):
        # Plain pickle: the bytes themselves (numpy arrays pickle by value).
        return _rebuild, (type(self), self._meta(), self._buffers())

    def _share(self) -> tuple:
        """Move the large buffers to shared memory (once) and return what to send."""
        if self._shared is not None:
            return self._shared
        out: list[Any] = []
        try:
            for a in self._buffers():
                if a.nbytes < SHARE_MIN_BYTES:
                    out.append(a)
                    continue
                tensor = torch.from_numpy(a.reshape(-1).view(np.uint8))
                tensor.share_memory_()  # copies into shared memory, the private copy is freed
                out.append((tensor, a.dtype.str, a.shape))
        except RuntimeError as exc:  # e.g. /dev/shm full or too small (docker: 64 MB)
            warnings.warn(
                f"nostall: could not move a {type(self).__name__} ({_mb(self.nbytes)}) to shared "
                f"memory ({exc}); each process it is sent to gets a copy. Make /dev/shm larger "
                "(docker: --shm-size) to share it.",
                RuntimeWarning,
                stacklevel=2,
            )
            self._shared = self._buffers()
            return self._shared
        self._shared = tuple(out)
        self._set_buffers(tuple(_unshared(b) for b in out))
        return self._shared

    def __eq__(self, other: object) -> bool:
        if isinstance(other, _Flat):
            if type(other) is not type(self) or other._meta() != self._meta():
                return False
            return all(np.array_equal(a, b) for a, b in zip(self._buffers(), other._buffers()))
        if isinstance(other, (list, tuple)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # equal to lists, which do not hash

    def _index(self, index: Any) -> int:
        """``index`` as a non-negative int in range, or an error naming it."""
        n = len(self)
        try:
            i = operator.index(index)
        except TypeError:
            raise TypeError(
                f"{type(self).__name__} indices must be int or slice; got {type(index).__name__}. "
                "Index one item at a time, or take a slice (c[a:b] or c[a:b:step])."
            ) from None
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"{type(self).__name__} index {index} out of range for length {n}")
        return i

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self):,} {self._what()}, {_mb(self.nbytes)})"

    def _what(self) -> str:
        return "items"


def _unshared(item: Any) -> np.ndarray:
    """A buffer as sent by ``_share``: an array, or (uint8 tensor, dtype, shape)."""
    if isinstance(item, np.ndarray):
        return item
    tensor, dtype, shape = item
    return tensor.numpy().view(np.dtype(dtype)).reshape(shape)


def _rebuild(cls: type, meta: tuple, buffers: tuple) -> _Flat:
    obj = cls.__new__(cls)
    obj._restore(meta)
    if any(not isinstance(b, np.ndarray) for b in buffers):
        obj._shared = buffers  # already shared: sending it on shares the same memory
    obj._set_buffers(tuple(_unshared(b) for b in buffers))
    return obj


def _reduce_for_process(obj: _Flat):
    """ForkingPickler's reducer: send shared memory instead of bytes."""
    return _rebuild, (type(obj), obj._meta(), obj._share())


def _slice_indices(index: slice, n: int) -> np.ndarray:
    return np.arange(*index.indices(n), dtype=np.int64)


# --------------------------------------------------------------------------- #
# Variable-length items: StringArray and ObjectArray
# --------------------------------------------------------------------------- #


class _Segments(_Flat):
    """Items stored end to end in one uint8 buffer; item i is data[offsets[i]:offsets[i+1]]."""

    def _buffers(self) -> tuple[np.ndarray, ...]:
        return (self._data, self._offsets)

    def _set_buffers(self, arrays: tuple[np.ndarray, ...]) -> None:
        self._data, self._offsets = arrays
        # memoryviews index faster than numpy arrays and return plain ints.
        self._mv = memoryview(self._data).cast("B")
        self._ov = memoryview(self._offsets).cast("B").cast("q")
        self._n = len(self._offsets) - 1

    def _fill(self, encoded: list) -> None:
        """Set the buffers from a list of bytes-like items."""
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum(np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)), out=offsets[1:])
        data = np.frombuffer(bytearray().join(encoded), dtype=np.uint8)  # writable: torch wants that
        self._set_buffers((data, offsets))

    def __len__(self) -> int:
        return self._n

    def _take(self, index: slice):
        """A new container holding the items ``index`` selects (copied: O(their bytes))."""
        idx = _slice_indices(index, self._n)
        off = self._offsets
        out = type(self).__new__(type(self))
        out._restore(self._meta())
        if index.step in (None, 1):
            start, stop = (int(off[idx[0]]), int(off[idx[-1] + 1])) if len(idx) else (0, 0)
            data = self._data[start:stop].copy()
            offsets = off[idx[0] : idx[-1] + 2] - start if len(idx) else np.zeros(1, np.int64)
        else:  # gather variable-length pieces in one vectorized step
            starts = off[idx]
            lengths = off[idx + 1] - starts
            offsets = np.zeros(len(idx) + 1, dtype=np.int64)
            np.cumsum(lengths, out=offsets[1:])
            positions = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1], dtype=np.int64)
            data = self._data[positions]
        out._set_buffers((np.ascontiguousarray(data), np.ascontiguousarray(offsets)))
        return out


class StringArray(_Segments):
    """A read-only sequence of str (or of bytes) in one byte buffer plus int64 offsets.

    ``StringArray(items)`` takes a list of str (stored as UTF-8) or a list of bytes:
    O(total length), about 0.1 us per item. ``a[i]`` returns a new str/bytes
    (about 0.2 us for a short path); ``a[i:j:k]`` a new StringArray (a copy of the
    selected bytes); iteration and ``len`` as for a list. Memory: the bytes plus 8
    per item, against about 50 + length bytes per str object.
    """

    def __init__(self, items: Sequence[str] | Sequence[bytes], *, _name: str = "items") -> None:
        self._text = not len(items) or isinstance(items[0], str)
        kind = str if self._text else bytes
        if not all(issubclass(t, kind) for t in set(map(type, items))):
            _misfit(items, lambda x: isinstance(x, kind), _name, "a StringArray holds only str or only bytes",
                    f"Convert first, e.g. [str(x) for x in {_name}].")
        if self._text:
            # surrogatepass: file names decoded with surrogateescape round-trip too
            self._fill([s.encode("utf-8", "surrogatepass") for s in items])
        else:
            self._fill(items)

    def _meta(self) -> tuple:
        return (self._text,)

    def _restore(self, meta: tuple) -> None:
        (self._text,) = meta

    def _what(self) -> str:
        return "str" if self._text else "bytes"

    def _at(self, i: int):
        """Item ``i``, known to be in range (Records checks once for all columns)."""
        ov = self._ov
        piece = self._mv[ov[i] : ov[i + 1]]
        return str(piece, "utf-8", "surrogatepass") if self._text else bytes(piece)

    def __getitem__(self, index):
        if type(index) is int and 0 <= index < self._n:  # the hot path
            ov = self._ov
            piece = self._mv[ov[index] : ov[index + 1]]
            return str(piece, "utf-8", "surrogatepass") if self._text else bytes(piece)
        if isinstance(index, slice):
            return self._take(index)
        return self._at(self._index(index))

    def __iter__(self):
        ov, mv = self._ov, self._mv
        if self._text:
            for i in range(self._n):
                yield str(mv[ov[i] : ov[i + 1]], "utf-8", "surrogatepass")
        else:
            for i in range(self._n):
                yield bytes(mv[ov[i] : ov[i + 1]])

    def lengths(self) -> np.ndarray:
        """Each item's length in bytes (UTF-8 for str), as a new int64 array; O(n)."""
        return np.diff(self._offsets)


class ObjectArray(_Segments):
    """A read-only sequence of arbitrary picklable objects, stored as their pickles.

    The fallback ``Records`` uses for values that are neither strings nor numbers
    (lists of tags, nested dicts, None mixed with values). ``ObjectArray(items)``
    pickles each item (about 1 us for a small list); ``a[i]`` unpickles a fresh
    copy on every access (about 1 us for a small list). Prefer StringArray or
    NumberArray where the data fit: they are faster and smaller.
    """

    def __init__(self, items: Sequence[Any], *, _name: str = "items", _item: Callable[[int], str] | None = None) -> None:
        dumps, protocol = pickle.dumps, pickle.HIGHEST_PROTOCOL
        encoded = []
        for i, item in enumerate(items):
            try:
                encoded.append(dumps(item, protocol))
            except Exception as exc:  # pickling raises many types
                where = _item(i) if _item else f"{_name}[{i}]"
                raise TypeError(
                    f"{where} ({_a_value(item)}) cannot be pickled ({exc}); store something "
                    "picklable (e.g. a str or a number) instead."
                ) from exc
        self._fill(encoded)

    def _meta(self) -> tuple:
        return ()

    def _restore(self, meta: tuple) -> None:
        pass

    def _what(self) -> str:
        return "pickled objects"

    def _at(self, i: int):
        ov = self._ov
        return pickle.loads(self._mv[ov[i] : ov[i + 1]])

    def __getitem__(self, index):
        if type(index) is int and 0 <= index < self._n:
            ov = self._ov
            return pickle.loads(self._mv[ov[index] : ov[index + 1]])
        if isinstance(index, slice):
            return self._take(index)
        return self._at(self._index(index))

    def __iter__(self):
        ov, mv, loads = self._ov, self._mv, pickle.loads
        for i in range(self._n):
            yield loads(mv[ov[i] : ov[i + 1]])


# --------------------------------------------------------------------------- #
# Numbers: NumberArray
# --------------------------------------------------------------------------- #

_INT = (int, np.integer)
_FLOAT = (float, np.floating)
_BOOL = (bool, np.bool_)


def _number_kind(types: set[type]) -> str | None:
    """'bool', 'int' or 'float' when every type is one such number, else None."""
    if not types:
        return None
    if all(issubclass(t, _BOOL) for t in types):
        return "bool"
    if all(issubclass(t, _INT) and not issubclass(t, _BOOL) for t in types):
        return "int"
    if all(issubclass(t, _FLOAT) for t in types):
        return "float"
    return None


_DTYPES = {"bool": np.bool_, "int": np.int64, "float": np.float64}


class NumberArray(_Flat):
    """A read-only sequence of numbers in one numpy array.

    ``NumberArray(values)`` takes a list of int (stored as int64), of float
    (float64) or of bool, a list of equal-length lists (or tuples) of int or of
    float (a 2-D array; each item comes back as a list, or a tuple), or a numeric
    numpy array (copied, its dtype kept). O(n). ``a[i]`` returns a Python int,
    float or bool (about 0.1 us), or a new list/tuple for 2-D data (about 0.3 us);
    ``a[i:j:k]`` a new NumberArray; ``a.numpy()`` the whole array (a read-only view,
    no copy), for vectorized work such as class counts.
    """

    def __init__(self, values: Sequence[Any] | np.ndarray, *, _name: str = "values") -> None:
        if isinstance(values, np.ndarray):
            if values.dtype.kind not in "biuf" or values.ndim not in (1, 2):
                raise TypeError(
                    f"{_name} is a numpy array of dtype {values.dtype} with {values.ndim} dimension(s); "
                    "a NumberArray holds a 1-D or 2-D array of bool, int or float. For strings pass a "
                    "list of str (values.tolist()) to nostall.flat()."
                )
            self._rows = list if values.ndim == 2 else None
            self._set_buffers((np.array(values, order="C", copy=True),))
            return
        self._rows = None
        types = set(map(type, values))
        kind = _number_kind(types)
        if kind is None and types in ({list}, {tuple}):
            kind = self._rows_kind(values, _name)
            self._rows = types.pop()
        if kind is None:
            if not len(values):
                raise ValueError(f"{_name} is empty: nothing tells which numbers it holds. Pass a numpy array.")
            t0 = type(values[0])
            k0 = _number_kind({t0})
            _misfit(values, lambda x: _number_kind({type(x)}) == k0 if k0 else type(x) is t0, _name, "a NumberArray holds numbers of one kind (int, float "
                    "or bool) or equal-length lists of them",
                    f"Convert them first, e.g. [float(x) for x in {_name}], and keep None out of the list.")
        try:
            array = np.array(values, dtype=_DTYPES[kind])
        except OverflowError:
            raise OverflowError(
                f"{_name} holds an int outside the int64 range; store such values as str, or "
                "use nostall.ObjectArray (pickled, slower)."
            ) from None
        self._set_buffers((array,))

    @staticmethod
    def _rows_kind(values: Sequence[Sequence], name: str) -> str:
        n = len(values[0])
        for i, row in enumerate(values):
            if len(row) != n or not n:
                raise TypeError(
                    f"{name}[{i}] has length {len(row)}, but {name}[0] has length {n}: rows of a 2-D "
                    "NumberArray must all have one length (> 0). Pad them, or keep such values in a "
                    "Records column (pickled)."
                )
        kind = _number_kind({type(x) for row in values for x in row})
        if kind is None:
            raise TypeError(
                f"{name} holds rows whose elements are not all int, all float or all bool (e.g. "
                f"{name}[0] is {_a_value(values[0])}): convert them, e.g. "
                f"[[float(x) for x in row] for row in {name}]."
            )
        return kind

    def _meta(self) -> tuple:
        return (self._rows,)

    def _restore(self, meta: tuple) -> None:
        (self._rows,) = meta

    def _buffers(self) -> tuple[np.ndarray, ...]:
        return (self._array,)

    def _set_buffers(self, arrays: tuple[np.ndarray, ...]) -> None:
        (self._array,) = arrays
        self._item = self._array.item
        self._n = len(self._array)

    def _what(self) -> str:
        a = self._array
        return f"{a.dtype}" + (f"[{a.shape[1]}] rows" if a.ndim == 2 else " values")

    def __len__(self) -> int:
        return self._n

    def _at(self, i: int):
        if self._rows is None:
            return self._item(i)
        row = self._array[i].tolist()
        return row if self._rows is list else self._rows(row)

    def __getitem__(self, index):
        if type(index) is int and 0 <= index < self._n:
            if self._rows is None:
                return self._item(index)
            row = self._array[index].tolist()
            return row if self._rows is list else self._rows(row)
        if isinstance(index, slice):
            out = NumberArray.__new__(NumberArray)
            out._rows = self._rows
            out._set_buffers((self._array[index].copy(),))
            return out
        return self._at(self._index(index))

    def __iter__(self):
        rows = self._rows
        for start in range(0, self._n, 4096):  # tolist() in chunks: fast, little memory
            chunk = self._array[start : start + 4096].tolist()
            yield from (chunk if rows in (None, list) else map(rows, chunk))

    def numpy(self) -> np.ndarray:
        """The data as a read-only numpy array (a view: no copy)."""
        view = self._array.view()
        view.flags.writeable = False
        return view

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        if dtype is None and not copy:
            return self.numpy()
        return self._array.astype(dtype or self._array.dtype, copy=True)


# --------------------------------------------------------------------------- #
# Rows: Records
# --------------------------------------------------------------------------- #


def _column(values: list, name: str, item: Callable[[int], str]) -> _Flat:
    """The smallest, fastest container that holds ``values`` exactly."""
    types = set(map(type, values))
    if types == {str}:
        return StringArray(values, _name=name)
    if types == {bytes}:
        return StringArray(values, _name=name)
    if _number_kind(types) is not None or types in ({list}, {tuple}):
        try:
            return NumberArray(values, _name=name)
        except (TypeError, OverflowError):
            pass  # not numbers of one kind: keep them exactly, pickled
    return ObjectArray(values, _name=name, _item=item)


class Records(_Flat):
    """Rows stored column by column: a list of dicts with the same keys (or of tuples).

    ``Records(rows)`` takes a list of dicts with the same keys, a list of tuples of
    one length (namedtuples keep their type), or a dict of equal-length lists.
    Each column becomes a StringArray (str or bytes values), a NumberArray (numbers
    of one kind, or equal-length numeric lists) or an ObjectArray (anything else,
    pickled); ``repr`` shows which. O(rows x keys).

    ``r[i]`` builds a fresh dict (or tuple) from every column: the sum of the
    columns' costs, about 1-3 us for a few keys. ``r["key"]`` (or
    ``r.column(key)``) returns one column, whose ``[i]`` is cheaper when a sample
    needs only some keys. ``r[i:j:k]`` returns new Records.
    """

    def __init__(self, rows: Sequence[Any] | Mapping[Any, Sequence[Any]], *, _name: str = "rows") -> None:
        if isinstance(rows, Mapping):
            self._from_columns(rows, _name)
            return
        if not len(rows):
            raise ValueError(f"{_name} is empty: nothing tells which keys the rows have.")
        first = rows[0]
        if isinstance(first, dict):
            self._row_type = dict
            keys = list(first)
            key_view = first.keys()
            for i, row in enumerate(rows):
                if not isinstance(row, dict) or row.keys() != key_view:
                    self._key_misfit(rows, i, keys, _name)
            columns = [_column([row[k] for row in rows], f"the {k!r} values of {_name}",
                               lambda i, k=k: f"{_name}[{i}][{k!r}]") for k in keys]
        elif isinstance(first, tuple):
            self._row_type = type(first)
            n = len(first)
            for i, row in enumerate(rows):
                if type(row) is not self._row_type or len(row) != n:
                    raise TypeError(
                        f"{_name}[{i}] is {_a_value(row)}, but {_name}[0] is a "
                        f"{type(first).__name__} of length {n}: every row must be a tuple of the same "
                        "type and length."
                    )
            keys = list(range(n))
            columns = [_column([row[k] for row in rows], f"the values at {k} of {_name}",
                               lambda i, k=k: f"{_name}[{i}][{k}]") for k in keys]
        else:
            raise TypeError(f"{_name}[0] is {_a_value(first)}; {_SUPPORTED}.")
        self._set_columns(keys, columns)

    def _from_columns(self, mapping: Mapping, name: str) -> None:
        self._row_type = dict
        if not mapping:
            raise ValueError(f"{name} is an empty dict: there are no columns.")
        keys = list(mapping)
        lengths = {}
        for key in keys:
            value = mapping[key]
            if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray)):
                raise TypeError(
                    f"{name}[{key!r}] is {_a_value(value)}; in a dict of columns every value must be "
                    "a list (one item per row)."
                )
            lengths[key] = len(value)
        if len(set(lengths.values())) != 1:
            k0, k1 = keys[0], next(k for k in keys if lengths[k] != lengths[keys[0]])
            raise ValueError(
                f"{name}[{k1!r}] has {lengths[k1]:,} items but {name}[{k0!r}] has {lengths[k0]:,}: "
                "the columns of Records must have one length. For unrelated lists call nostall.flat() "
                "on each list separately."
            )
        columns = []
        for key in keys:
            value = mapping[key]
            if isinstance(value, _Flat) and not isinstance(value, Records):
                columns.append(value)
            elif isinstance(value, np.ndarray):
                columns.append(NumberArray(value, _name=f"{name}[{key!r}]"))
            else:
                columns.append(_column(list(value), f"{name}[{key!r}]", lambda i, key=key: f"{name}[{key!r}][{i}]"))
        self._set_columns(keys, columns)

    @staticmethod
    def _key_misfit(rows: Sequence, i: int, keys: list, name: str) -> None:
        row = rows[i]
        if not isinstance(row, dict):
            raise TypeError(f"{name}[{i}] is {_a_value(row)}, but {name}[0] is a dict: every row must be "
                            "a dict with the same keys.")
        missing = [k for k in keys if k not in row]
        extra = [k for k in row if k not in rows[0]]
        raise ValueError(
            f"{name}[{i}] has keys {list(row)}, but {name}[0] has {keys} (missing: {missing}, extra: "
            f"{extra}): every dict must have the same keys. Fill missing keys with a default such as "
            "None (that column is then pickled), or keep the odd rows apart."
        )

    def _set_columns(self, keys: list, columns: list) -> None:
        self._keys = tuple(keys)
        self._columns = tuple(columns)
        self._n = len(columns[0])
        self._getters = tuple(c._at for c in columns)  # bound once: no lookups per row
        self._pairs = tuple(zip(self._keys, self._getters))

    # Records holds no buffer of its own: pickling pickles the columns, and
    # ForkingPickler shares each column's buffers on its way.
    def __reduce__(self):
        return _rebuild_records, (self._row_type, self._keys, self._columns)

    def _meta(self) -> tuple:
        return (self._row_type, self._keys)

    def _buffers(self) -> tuple[np.ndarray, ...]:
        return tuple(b for c in self._columns for b in c._buffers())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Records):
            return self._meta() == other._meta() and self._columns == other._columns
        return super().__eq__(other)

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index):
        if type(index) is not int or not 0 <= index < self._n:
            if isinstance(index, slice):
                return _rebuild_records(self._row_type, self._keys, tuple(c[index] for c in self._columns))
            if isinstance(index, str):
                return self.column(index)
            index = self._index(index)
        if self._row_type is dict:
            row = {}
            for key, at in self._pairs:  # a plain loop: a comprehension costs a call in 3.11
                row[key] = at(index)
            return row
        values = [at(index) for at in self._getters]
        return tuple(values) if self._row_type is tuple else self._row_type._make(values)

    def __iter__(self):
        for i in range(self._n):
            yield self[i]

    def keys(self) -> list:
        """The row keys (dict rows) or positions 0..k-1 (tuple rows)."""
        return list(self._keys)

    @property
    def columns(self) -> dict:
        """Key -> column (StringArray, NumberArray or ObjectArray)."""
        return dict(zip(self._keys, self._columns))

    def column(self, key: Any):
        """The column of ``key``: its ``[i]`` costs less than building the whole row."""
        try:
            return self._columns[self._keys.index(key)]
        except ValueError:
            raise KeyError(f"Records has no column {key!r}; its keys are {list(self._keys)}.") from None

    def __repr__(self) -> str:
        parts = ", ".join(f"{k}={_column_kind(c)}" for k, c in zip(self._keys, self._columns))
        return f"Records({self._n:,} rows: {parts}; {_mb(self.nbytes)})"


def _column_kind(column: _Flat) -> str:
    if isinstance(column, StringArray):
        return column._what()
    if isinstance(column, NumberArray):
        a = column._array
        return f"{a.dtype}" + (f"[{a.shape[1]}]" if a.ndim == 2 else "")
    return "pickled"


def _rebuild_records(row_type: type, keys: tuple, columns: tuple) -> Records:
    obj = Records.__new__(Records)
    obj._row_type = row_type
    obj._set_columns(list(keys), list(columns))
    return obj


for _cls in (StringArray, ObjectArray, NumberArray):
    ForkingPickler.register(_cls, _reduce_for_process)


# --------------------------------------------------------------------------- #
# The one-line conversion
# --------------------------------------------------------------------------- #


def flat(obj: Any) -> StringArray | NumberArray | Records:
    """Convert dataset metadata to a flat container that workers share without copying.

    ``nostall.flat(paths)`` for a list of str or bytes (StringArray), a list of
    numbers or of equal-length numeric lists (NumberArray), a list of dicts with
    the same keys, a list of tuples of one length, or a dict of equal-length lists
    (Records). A container or numpy array passes through (the array as a
    NumberArray). Items read back equal the originals: ``list(flat(x)) == x``.
    Raises TypeError/ValueError naming the first item that does not fit and what
    to do; arbitrary objects go in ``ObjectArray(items)`` explicitly.
    """
    if isinstance(obj, _Flat):
        return obj
    if isinstance(obj, np.ndarray):
        return NumberArray(obj, _name="obj")
    if isinstance(obj, Mapping):
        return Records(obj, _name="obj")
    if isinstance(obj, (str, bytes)) or not isinstance(obj, Sequence):
        raise TypeError(f"obj is {_a_value(obj)}; {_SUPPORTED}.")
    if not len(obj):
        raise ValueError(
            "obj is empty: nothing tells which container to build. Build one explicitly, "
            "e.g. nostall.StringArray([]) or nostall.NumberArray(numpy.zeros(0))."
        )
    first = obj[0]
    if isinstance(first, (str, bytes)):
        return StringArray(obj, _name="obj")
    if isinstance(first, (dict, tuple)):
        return Records(obj, _name="obj")
    if isinstance(first, (list, *_INT, *_FLOAT, *_BOOL)):
        return NumberArray(obj, _name="obj")
    raise TypeError(
        f"obj[0] is {_a_value(first)}; {_SUPPORTED}. Convert the items (e.g. paths with "
        "[str(p) for p in obj]), or for arbitrary picklable objects use nostall.ObjectArray(obj) "
        "(each access unpickles a copy)."
    )
