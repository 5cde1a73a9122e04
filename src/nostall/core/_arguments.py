"""Arguments as torch validates them: torch's exception and message first, nostall's
explanation after it, and the checks torch makes at ``iter()`` made at ``iter()``.

``nostall.DataLoader`` lets torch's own ``__init__`` validate every torch argument
(so the exception type and message are torch's) and only then checks its own.
Some values torch accepts when a loader is built and refuses when an iterator is
made (``timeout`` without workers, ``prefetch_factor=0``, a ``generator`` that is
not a ``torch.Generator``, a float ``num_workers``): :func:`iter_error` and
:func:`check_generator` give the same error at the same moment.
"""

from __future__ import annotations

import operator

import torch

from ..workers import _stateful


def is_auto(value) -> bool:
    """Is ``value`` nostall's ``"auto"`` (for num_workers, prefetch_factor)?"""
    return isinstance(value, str) and value == "auto"


def positive(value) -> bool:
    """``value > 0`` as torch evaluates it, False where that comparison fails (torch reports it)."""
    try:
        return bool(value > 0)
    except TypeError:
        return False


def as_count(value) -> int:
    """An int for nostall's own bookkeeping; 0 for a value torch refuses at ``iter()``."""
    try:
        return max(0, operator.index(value))
    except TypeError:
        return 0


def explain(exc: BaseException, hint: str | None) -> None:
    """Append nostall's explanation to torch's message, which stays first."""
    if hint and len(exc.args) == 1 and isinstance(exc.args[0], str):
        exc.args = (f"{exc.args[0]} (nostall: {hint})",)


def constructor_hint(num_workers, auto_prefetch: bool) -> str | None:
    """What nostall adds to torch's error from ``__init__`` for these arguments, if anything."""
    try:
        operator.index(num_workers)
    except TypeError:
        if not isinstance(num_workers, float):
            return f"`num_workers` must be an int >= 0 or 'auto'; got {num_workers!r}."
    if auto_prefetch and num_workers == 0:
        return "prefetch_factor='auto' tunes the batches each worker prepares; it needs num_workers > 0."
    return None


def iter_error(num_workers, prefetch_factor, timeout) -> BaseException | None:
    """The error torch's DataLoader raises at ``iter()`` for these arguments (not at construction)."""
    try:
        if num_workers == 0:
            if timeout != 0:
                return AssertionError(
                    "_SingleProcessDataLoaderIter requires timeout == 0 (nostall: `timeout` applies only to "
                    f"worker loading; got timeout={timeout!r} with num_workers=0. Set num_workers > 0 or timeout=0.)")
            return None
        if prefetch_factor <= 0:
            return AssertionError(
                "prefetch_factor must be greater than 0 for MultiProcessingDataLoaderIter (nostall: got "
                f"prefetch_factor={prefetch_factor!r}; pass an int >= 1, 'auto' or None for 2.)")
        range(num_workers)
        range(prefetch_factor * num_workers)
    except TypeError as exc:
        explain(exc, f"`num_workers` must be an int >= 0 or 'auto' and `prefetch_factor` an int >= 1 or "
                      f"'auto'; got num_workers={num_workers!r}, prefetch_factor={prefetch_factor!r}.")
        return exc
    return None


def check_generator(generator) -> None:
    """Refuse a ``generator`` that is not a ``torch.Generator`` exactly as torch's iterator does."""
    if generator is not None and not isinstance(generator, torch.Generator):
        # The draw torch makes first in every iterator; it raises torch's own TypeError.
        torch.empty((), dtype=torch.int64).random_(generator=generator)


def sync_dataset(dataset, setting: bool | None) -> bool:
    """Whether attributes reassigned on the dataset in this process reach process workers:
    by default for datasets that take part in epochs or in resume (see ``sync_dataset_attributes``)."""
    if setting is not None:
        return setting
    return callable(getattr(dataset, "set_epoch", None)) or _stateful.stateful(dataset)
