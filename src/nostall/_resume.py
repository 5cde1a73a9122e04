"""Checking a saved ``loader.state_dict()`` before it is loaded.

A state is only meaningful for a loader built like the one that saved it: the
same dataset size, batch size, sampler and ``drop_last``. ``check`` says what does
not match, field by field, before anything changes.
"""

from __future__ import annotations

from typing import Any

VERSION = 1
_REQUIRED = ("epoch", "delivered", "base_seed", "generators", "global_rng", "private_generator",
             "epochs_set", "states")


def fingerprint(loader) -> dict[str, Any]:
    """What must match between the loader that saved a state and the one loading it."""
    try:
        size = len(loader.dataset)
    except TypeError:
        size = None
    return {
        "dataset": type(loader.dataset).__name__,
        "dataset_len": size,
        "batch_size": loader.batch_size,
        "drop_last": loader.drop_last,
        "sampler": type(loader.sampler).__name__,
        "batch_sampler": type(loader.batch_sampler).__name__ if loader.batch_sampler is not None else None,
        "in_order": loader.in_order,
    }


def check(state: Any, loader) -> None:
    """Raise ValueError naming what is wrong with ``state`` for ``loader``."""
    if not isinstance(state, dict):
        raise ValueError(f"`state` must be the dict loader.state_dict() returned; got {type(state).__name__}.")
    version = state.get("version")
    if version != VERSION:
        raise ValueError(
            f"`state` has version {version!r}; this nostall reads version {VERSION}. It was saved by "
            "another nostall version, or is not a nostall loader state."
        )
    saved, mine = state.get("loader", {}), fingerprint(loader)
    wrong = [f"{key}: saved {saved.get(key)!r}, this loader {value!r}"
             for key, value in mine.items() if saved.get(key) != value]
    if wrong:
        raise ValueError(
            "`state` was saved by a loader built differently (" + "; ".join(wrong) + "). Build the "
            "loader as before (num_workers may differ) to continue where it stopped."
        )
    if state.get("fresh"):
        return
    missing = [key for key in _REQUIRED if key not in state]
    if missing:
        raise ValueError(f"`state` lacks {', '.join(missing)}: it is not a complete loader.state_dict().")
    delivered = state["delivered"]
    if isinstance(state["epoch"], bool) or not isinstance(state["epoch"], int) or state["epoch"] < 0:
        raise ValueError(f"`state['epoch']` must be an int >= 0; got {state['epoch']!r}.")
    if not (isinstance(delivered, int) and delivered >= 0 or isinstance(delivered, list)):
        raise ValueError(f"`state['delivered']` must be an int >= 0 or a list of batch numbers; got {delivered!r}.")
