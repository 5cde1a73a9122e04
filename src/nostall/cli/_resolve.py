"""Naming user code on the command line: ``package.module:attribute``.

``nostall bench``, ``tune`` and ``doctor`` take the user's dataset as a
``module:factory`` reference (a function returning the dataset) and optionally a
``module:fn`` collate function; this module resolves such references with
errors that say what was wrong and what to write instead.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any, Callable


def is_reference(text: str) -> bool:
    """Whether ``text`` looks like ``module:attribute`` (and not a built-in workload name)."""
    module, sep, attr = text.partition(":")
    return bool(sep and module and attr)


def resolve(text: str, what: str = "reference") -> Any:
    """Import ``module`` and return ``module.attribute`` (dotted attributes allowed).

    The current directory is importable, as it is for ``python -m``. ``what`` names
    the command-line argument in error messages (e.g. ``"--dataset"``).
    """
    if not is_reference(text):
        raise ValueError(
            f"{what} must look like `package.module:function`; got {text!r}. "
            "Name the module (importable from the current directory) and the function, "
            "separated by a colon."
        )
    module_name, _, attr_path = text.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(
            f"{what}: cannot import module {module_name!r} ({exc}). Run from the directory "
            "that holds it or put it on PYTHONPATH."
        ) from exc
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"{what}: module {module_name!r} has no attribute {attr_path!r}.") from None
    return obj


def call_factory(text: str, what: str = "--dataset") -> Any:
    """Resolve ``module:factory`` and call it with no arguments; return the dataset."""
    factory: Callable[[], Any] = resolve(text, what)
    if not callable(factory):
        raise ValueError(f"{what}: {text!r} is a {type(factory).__name__}, not a function returning a dataset.")
    return factory()
