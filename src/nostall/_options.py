"""Every loader option nostall validates, defined once.

One :class:`Option` per setting of ``nostall.DataLoader`` that does not depend on
code (no dataset, sampler, collate_fn, worker_init_fn or generator): its default,
what it accepts and how an error says so. From this table come

* ``nostall.DataLoader``'s checks of nostall's own arguments (:func:`check_loader_arguments`;
  torch's arguments stay torch's to validate, with torch's exceptions, first);
* :class:`nostall.LoaderConfig`'s fields, defaults and validation (the YAML file);
* the command line's choices (:data:`START_METHODS`, :data:`WORKER_TYPES`) and its
  integer argument types.

Error texts are written with Python's words (``None``, ``True``); the YAML file's
messages say ``null`` and ``true`` instead (:meth:`Option.problem`).

This module imports nothing heavy: the command line reads it without importing torch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

WORKER_TYPES = ("process", "thread", "auto", "ray")
# Ray actor options nostall sets itself: it replaces dead actors and sends their batches again.
RAY_OWN_OPTIONS = ("max_restarts", "max_task_retries", "max_concurrency", "concurrency_groups", "lifetime", "name")
START_METHODS = ("fork", "spawn", "forkserver")
ON_HANG = ("restart", "raise")
ON_SAMPLE_ERROR = ("raise", "skip")


# --------------------------------------------------------------------------- #
# Predicates
# --------------------------------------------------------------------------- #


def is_int(value: Any) -> bool:
    """An int that is not a bool (``True`` is an int in Python, never a count)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An int (not a bool) or a float."""
    return is_int(value) or isinstance(value, float)


def int_from(low: int) -> Callable[[Any], bool]:
    """Accepts an int (not a bool) >= ``low``."""
    return lambda v: is_int(v) and v >= low


def _finite_from(low: float) -> Callable[[Any], bool]:
    return lambda v: is_number(v) and math.isfinite(v) and v >= low


def _above(low: float) -> Callable[[Any], bool]:
    return lambda v: is_number(v) and v > low


def _between(low: float, high: float) -> Callable[[Any], bool]:
    return lambda v: is_number(v) and low <= v <= high


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


def _one_of(*choices: str) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, str) and v in choices


def _ray_actor_options(value: Any) -> bool:
    return isinstance(value, Mapping) and all(isinstance(k, str) for k in value) and not set(value) & set(RAY_OWN_OPTIONS)


def _or_none(test: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or test(v)


def _any(*tests: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: any(t(v) for t in tests)


def choices_text(values: tuple[str, ...]) -> str:
    """``'a', 'b', 'c'``: choices as an error message lists them."""
    return ", ".join(repr(v) for v in values)


_YAML_WORDS = {"None": "null", "True": "true", "False": "false"}
_PYTHON_WORD = re.compile(r"\b(None|True|False)\b")


# --------------------------------------------------------------------------- #
# The table
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class Option:
    """One loader option.

    ``allowed`` completes "must be ..." in error messages, in Python's words;
    ``hint`` follows the message (what to choose). ``owner`` says who validates the
    constructor's argument: ``"torch"`` (torch's own ``__init__`` or iterator, with
    its exceptions), ``"nostall"`` (:func:`check_loader_arguments`), or ``"lenient"``
    (nostall's, but any value has always been taken, e.g. ``stats``'s truthiness).
    A configuration file checks every option. ``annotation`` is the field's type in
    :class:`nostall.LoaderConfig`; ``convert`` normalises an accepted value there.
    """

    name: str
    default: Any
    allowed: str
    accepts: Callable[[Any], bool]
    annotation: str
    doc: str
    owner: str = "torch"
    hint: str = ""
    convert: Callable[[Any], Any] | None = None

    def problem(self, value: Any, yaml: bool = False) -> str:
        """The sentence after the option's name for an invalid ``value``."""
        allowed = _PYTHON_WORD.sub(lambda m: _YAML_WORDS[m.group(1)], self.allowed) if yaml else self.allowed
        return f"must be {allowed}; got {value!r}." + (f" {self.hint}" if self.hint else "")

    def error(self, value: Any) -> ValueError:
        """The constructor's ValueError for an invalid ``value``."""
        return ValueError(f"`{self.name}` {self.problem(value)}")


_BOOL = dict(allowed="True or False", accepts=_is_bool, annotation="bool")

OPTIONS: dict[str, Option] = {o.name: o for o in (
    Option("batch_size", 1, "an int >= 1", int_from(1), "int",
           "Samples per batch."),
    # The constructor's default is torch's None, which means the same as False.
    Option("shuffle", False, doc="Reshuffle the samples every epoch.", **_BOOL),
    Option("drop_last", False, doc="Drop the last, incomplete batch.", **_BOOL),
    Option("num_workers", 0, "an int >= 0 or 'auto'", _any(int_from(0), _one_of("auto")), "int | str",
           "Worker processes (or threads); 'auto' tunes the number while the loop runs."),
    # torch accepts 0 when building but its worker iterator refuses it.
    Option("prefetch_factor", None, "an int >= 1, 'auto', or None for torch's default (2)",
           _or_none(_any(int_from(1), _one_of("auto"))), "int | str | None",
           "Batches prepared ahead per worker; 'auto' tunes it."),
    Option("persistent_workers", None, "True, False, or None (True when num_workers > 0)",
           _or_none(_is_bool), "bool | None",
           "Keep workers between epochs (nostall's default: when num_workers > 0)."),
    Option("pin_memory", False, doc="Copy batches into pinned memory for the accelerator.", **_BOOL),
    Option("pin_memory_device", "", "a string (torch deprecates it: the current accelerator is used)",
           _is_str, "str", "torch's deprecated device for pinned memory; leave it empty."),
    Option("worker_type", "process", f"one of {choices_text(WORKER_TYPES)}", _one_of(*WORKER_TYPES), "str",
           "Workers as processes, threads, 'auto' (processes, switched to threads when they mostly wait), "
           "or 'ray' (Ray actors, on other machines of a Ray cluster).",
           owner="nostall",
           hint="Use 'thread' for I/O-bound datasets that release the GIL, 'process' otherwise, "
                "'auto' to let nostall choose, 'ray' for more CPUs than this machine has."),
    Option("ray_actor_options", None, "None or a dict of Ray actor options (num_cpus, num_gpus, memory, "
           f"resources, scheduling_strategy, runtime_env, ...) without {', '.join(RAY_OWN_OPTIONS)}",
           _or_none(_ray_actor_options), "dict | None",
           "With worker_type='ray': what each actor asks Ray for (its .options(); None: num_cpus=1).",
           owner="nostall",
           hint="nostall replaces dead actors itself and runs one batch at a time per actor."),
    Option("multiprocessing_context", None, f"one of {choices_text(START_METHODS)}, or None for the "
           "platform's default", _or_none(_one_of(*START_METHODS)), "str | None",
           "The start method of worker processes."),
    Option("timeout", 0.0, "a number of seconds >= 0", _finite_from(0), "float",
           "Seconds to wait for a batch from the workers (0: no limit).", convert=float),
    Option("in_order", True, doc="Deliver batches in sampler order.", **_BOOL),
    Option("stats", True, doc="Keep loader.stats (about a microsecond per batch).", owner="lenient", **_BOOL),
    Option("max_worker_restarts", 3, "an int >= 0", int_from(0), "int",
           "Worker failures in a row, with no batch delivered in between, before the loader raises.",
           owner="nostall"),
    Option("hang_timeout", None, "None (automatic) or a number of seconds > 0", _or_none(_above(0)),
           "float | None", "Seconds after which a batch counts as hung (None: 20 times the median "
           "batch, at least 30 s).", owner="nostall"),
    Option("on_hang", "restart", f"one of {choices_text(ON_HANG)}", _one_of(*ON_HANG), "str",
           "What a hung batch does: restart its worker or raise.", owner="nostall"),
    Option("on_sample_error", "raise", f"one of {choices_text(ON_SAMPLE_ERROR)}", _one_of(*ON_SAMPLE_ERROR),
           "str", "What a sample whose __getitem__ raises does: raise, or be left out of its batch.",
           owner="nostall"),
    Option("max_skipped_fraction", 0.01, "a number from 0 to 1", _between(0.0, 1.0), "float",
           "With on_sample_error='skip': the most of an epoch's samples that may be left out.",
           owner="nostall"),
    Option("max_inflight_bytes", None, "None or an int > 0 (bytes)", _or_none(int_from(1)), "int | None",
           "Bounds the batches in flight in bytes too (None: no bound).", owner="nostall"),
    Option("sync_dataset_attributes", None, "None (automatic: on for datasets with set_epoch or "
           "load_state_dict), True or False", _or_none(_is_bool), "bool | None",
           "Attributes reassigned on the dataset reach process workers.", owner="nostall"),
)}


def check_loader_arguments(values: Mapping[str, Any]) -> None:
    """Raise the constructor's ValueError for the first invalid nostall-owned argument in ``values``."""
    for name, value in values.items():
        option = OPTIONS[name]
        if option.owner == "nostall" and not option.accepts(value):
            raise option.error(value)


def check_start_method(method: Any) -> None:
    """Refuse a start method workers cannot use (a custom multiprocessing context's)."""
    if method not in START_METHODS:
        raise ValueError(f"`multiprocessing_context` must use one of {', '.join(START_METHODS)}; got {method!r}.")


# --------------------------------------------------------------------------- #
# Command-line argument types
# --------------------------------------------------------------------------- #


def non_negative_int(text: str) -> int:
    """argparse type: an int >= 0."""
    import argparse  # here: the loader imports this module and never parses arguments

    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0; got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    import argparse

    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1; got {value}")
    return value
