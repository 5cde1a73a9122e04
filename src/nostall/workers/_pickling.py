"""Checking, before any process starts, that what spawn must send can be pickled."""

from __future__ import annotations

import pickle
from multiprocessing.reduction import ForkingPickler


def _dumps(obj) -> None:
    ForkingPickler.dumps(obj)


def _children(obj):
    if isinstance(obj, dict):
        return [(f"[{k!r}]", v) for k, v in obj.items()]
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [(f"[{i}]", v) for i, v in enumerate(obj)]
    attrs = getattr(obj, "__dict__", None)
    if isinstance(attrs, dict):
        return [(f".{k}", v) for k, v in attrs.items()]
    return []


def unpicklable_path(obj, name: str, _depth: int = 0, dumps=_dumps):
    """The deepest attribute path under ``obj`` that fails to pickle, with the error.

    Returns ``None`` when ``obj`` pickles. The path reads like ``dataset.transform.fn``.
    ``dumps`` is the serializer that must succeed (default: multiprocessing's pickler).
    """
    try:
        dumps(obj)
        return None
    except Exception as exc:  # pickling raises many types (PicklingError, TypeError, AttributeError)
        error = exc
    if _depth < 8:
        for suffix, child in _children(obj):
            found = unpicklable_path(child, name + suffix, _depth + 1, dumps)
            if found is not None:
                return found
    return name, obj, error


def check_picklable(start_method: str, **parts) -> None:
    """Raise a clear error naming the first part that cannot be sent to a new interpreter."""
    for name, obj in parts.items():
        found = unpicklable_path(obj, name)
        if found is None:
            continue
        path, culprit, error = found
        raise pickle.PicklingError(
            f"nostall cannot start workers with start method {start_method!r}: `{path}` "
            f"({type(culprit).__name__}: {_short(culprit)}) cannot be pickled ({error}). "
            "Define functions and classes at module level instead of lambdas or local "
            "functions, drop open files and locks from the dataset, or use "
            "multiprocessing_context='fork'."
        )


def _short(obj) -> str:
    text = repr(obj)
    return text if len(text) <= 80 else text[:77] + "..."
