"""Large Python containers on a dataset: the copy-on-read check, kept light.

Each worker that reads an element of a large Python list or dict updates its
reference count, copying the memory page it sits on (pytorch/pytorch#13246).
``find_large_containers`` finds such containers on a dataset from a sample of
their elements, in a few milliseconds; the loader runs it when workers start
and ``nostall doctor`` reports it. Standard library only, so importing it at
start-up costs nothing.
"""

from __future__ import annotations

import itertools
import sys
import types
from collections import Counter
from typing import Any, NamedTuple

MIN_ELEMENTS = 10_000  # containers this long are worth a copy-on-read warning

CONTAINERS = (list, dict, tuple, set, frozenset)


class Container(NamedTuple):
    """A large Python container found on a dataset: attribute path, type, length, bytes."""

    path: str
    kind: str
    count: int
    nbytes: int


def _attributes(obj: Any) -> list[tuple[str, Any]]:
    out = list(vars(obj).items()) if isinstance(getattr(obj, "__dict__", None), dict) else []
    for cls in type(obj).__mro__:
        slots = getattr(cls, "__slots__", ())
        for name in [slots] if isinstance(slots, str) else slots:
            if name not in ("__dict__", "__weakref__") and hasattr(obj, name):
                out.append((name, getattr(obj, name)))
    return out


_NOT_DATA = (types.ModuleType, type, types.FunctionType, types.MethodType, types.BuiltinFunctionType)


def find_large_containers(dataset: Any, min_elements: int = MIN_ELEMENTS, sample: int = 1000) -> list[Container]:
    """Python containers of ``min_elements`` or more on ``dataset``: its attributes, one level
    into the objects and small dicts it holds (``dataset.index.samples``, ``dataset.splits['train']``);
    sizes estimated from ``sample`` elements each (see :func:`estimate_size`)."""
    found: list[Container] = []

    def visit(path: str, value: Any, depth: int) -> None:
        if isinstance(value, CONTAINERS):
            if len(value) >= min_elements:
                found.append(Container(path, type(value).__name__, len(value), estimate_size(value, sample)))
            elif depth < 1 and isinstance(value, dict):
                for key, item in value.items():
                    visit(f"{path}[{key!r}]", item, depth + 1)
        elif depth < 1 and not isinstance(value, _NOT_DATA):
            for name, item in _attributes(value):
                visit(f"{path}.{name}", item, depth + 1)

    if isinstance(dataset, CONTAINERS):  # a plain list passed as the dataset
        visit("dataset", dataset, 1)
    for name, value in _attributes(dataset):
        visit(f"dataset.{name}", value, 0)
    return found


def _parts(obj: Any) -> list[Any]:
    """An element and the objects it holds directly (the first 1,000: an estimate)."""
    if isinstance(obj, dict):
        return [obj, *itertools.islice(itertools.chain(obj.keys(), obj.values()), 2000)]
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [obj, *itertools.islice(obj, 1000)]
    return [obj]


def estimate_size(container: Any, sample: int = 1000) -> int:
    """Bytes of a container and its elements (and their direct contents), from a sample.

    Objects seen in several sampled elements (interned dict keys, small ints, a shared
    label string) exist once and are counted once; the rest is scaled to the length.
    """
    n = len(container)
    if n == 0:
        return sys.getsizeof(container)
    if isinstance(container, (list, tuple)):
        k = min(n, sample)
        elements = [_parts(container[i * n // k]) for i in range(k)]
    elif isinstance(container, dict):
        elements = [[key, *_parts(value)] for key, value in itertools.islice(container.items(), sample)]
    else:
        elements = [_parts(e) for e in itertools.islice(container, sample)]
    sizes: dict[int, int] = {}
    refs: Counter[int] = Counter()
    for parts in elements:
        ids = set()
        for obj in parts:
            if id(obj) not in ids:
                ids.add(id(obj))
                sizes[id(obj)] = sys.getsizeof(obj)
        refs.update(ids)
    own = sum(size for i, size in sizes.items() if refs[i] == 1)
    shared = sum(size for i, size in sizes.items() if refs[i] > 1)
    return sys.getsizeof(container) + round(own * n / len(elements)) + shared
