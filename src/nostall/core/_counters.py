"""Epoch counters an iterable dataset keeps by itself, which a resume cannot restore.

An iterable dataset without a ``state_dict()`` resumes by replay: each worker starts a
fresh iterator and drops the samples it had delivered. That is exact only when the
stream depends on nothing but the epoch nostall restores (``set_epoch``, plain
attributes of the dataset copied into the workers) and nostall's per-batch seeds.
A counter the dataset advances itself, in each worker's copy (webdataset's
``detshuffle``, litdata's ``current_epoch``), starts again from its first value in a
new run, so a resumed epoch >= 1 would silently follow epoch 0's order. nostall
cannot see the workers' copies, so it looks at the main process's: int attributes
named like an epoch anywhere in the dataset's object graph (``find``), recorded when
the saving loader started and when it saved (``record``), and compared at the first
``iter()`` after the resume (``unrestored``).
"""

from __future__ import annotations

import inspect
import re
import types

import torch

from ..workers import _stateful

_NAME = re.compile(r"^_*(current_|cur_)?epochs?$", re.IGNORECASE)
_LEAVES = (str, bytes, bytearray, int, float, complex, bool, type(None), torch.Tensor, types.ModuleType, type,
           types.FunctionType, types.BuiltinFunctionType, types.MethodType)
_MAX_DEPTH, _MAX_NODES, _MAX_ITEMS = 5, 2000, 64  # a bounded look: datasets may hold millions of objects


def find(dataset) -> dict[str, int]:
    """``{"dataset.pipeline[3].epoch": -1, ...}``: int attributes named epoch,
    _epoch, current_epoch (...) reachable from ``dataset`` through attributes and
    small lists, tuples and dicts."""
    found: dict[str, int] = {}
    seen: set = set()
    todo = [("dataset", dataset, 0)]
    while todo and len(seen) < _MAX_NODES:
        path, obj, depth = todo.pop(0)
        if id(obj) in seen or isinstance(obj, _LEAVES) or _is_array(obj):
            continue
        seen.add(id(obj))
        if isinstance(obj, (list, tuple)):
            children = [(f"{path}[{i}]", v) for i, v in enumerate(obj[:_MAX_ITEMS])]
        elif isinstance(obj, dict):
            children = [(f"{path}[{k!r}]", v) for k, v in list(obj.items())[:_MAX_ITEMS] if isinstance(k, str)]
        else:
            attrs = getattr(obj, "__dict__", None)
            if not isinstance(attrs, dict):
                continue
            children = []
            for name, value in list(attrs.items()):
                if type(value) is int and _NAME.match(name):
                    found[f"{path}.{name}"] = value
                else:
                    children.append((f"{path}.{name}", value))
        if depth < _MAX_DEPTH:
            todo.extend((p, v, depth + 1) for p, v in children)
    return found


def _is_array(obj) -> bool:
    return type(obj).__module__.startswith(("numpy", "pyarrow", "pandas"))


def unrestored(first: dict, saved: dict, now: dict, num_workers: int, has_set_epoch: bool) -> dict:
    """The counters of ``saved`` (main process, at the save) a resume does not bring
    back: ``{path: (value at the start, at the save, now)}``. One is brought back when
    its value now is the saved one and, with workers, the main process had set it (it
    changed since the saving loader started: nostall copies it into the workers); one
    the main process never changed was advanced, if at all, by the workers' copies,
    unseen. A dataset with ``set_epoch`` whose own (top-level) counter is brought back
    is trusted to derive the rest from it."""
    def restored(path):
        return now.get(path) == saved[path] and (num_workers == 0 or first.get(path) != saved[path])

    if has_set_epoch and any(restored(p) for p in saved if "." not in p[len("dataset."):] and "[" not in p):
        return {}
    return {p: (first.get(p), saved[p], now.get(p)) for p in saved if not restored(p)}


def own_state(dataset) -> str | None:
    """How ``dataset`` says it keeps a position nostall cannot save: a ``state_dict``
    that needs arguments only its own loader passes (litdata, MosaicML streaming; the
    latter keeps its epoch in shared memory, where no attribute shows it)."""
    fn = getattr(dataset, "state_dict", None)
    if not callable(fn) or _stateful.takes_no_arguments(fn):
        return None
    try:
        signature = str(inspect.signature(fn))
    except (TypeError, ValueError):
        signature = "(...)"
    return f"its own position and epoch (state_dict{signature} needs arguments only its own loader passes)"


def warning(dataset, epoch: int, lost: dict, own: str | None = None) -> str:
    """The text of the warning for ``lost`` counters (see ``unrestored``) and a
    position of the dataset's own (``own_state``)."""
    name = type(dataset).__name__
    def how(first, saved, now):
        if first == saved == now:
            return f"{saved} in the main process throughout: the workers' copies advance it"
        return f"{saved} at the save, {now} now"

    listed = [f"{path} ({how(*values)})" for path, values in lost.items()] + ([own] if own else [])
    return (
        f"nostall cannot resume the {name} exactly: the state was saved in epoch {epoch}, and the dataset keeps "
        f"state nostall cannot restore: {'; '.join(listed)}. Without a state_dict() of its own, an iterable "
        "dataset resumes by restarting each worker's stream and dropping the samples it had delivered; a "
        "counter the dataset advances by itself (in each worker's copy, e.g. webdataset's detshuffle, litdata's "
        f"current_epoch) starts again from its first value, so the resumed epoch may follow epoch 0's order, "
        f"not epoch {epoch}'s. To resume exactly, set the epoch from the main process before each iter(loader) "
        "(a set_epoch(epoch) on the dataset that stores it in a plain attribute of the dataset, which nostall "
        "copies into its workers and restores), or give the dataset state_dict()/load_state_dict() "
        "(state_dict taking no arguments)."
    )
