"""Checking a saved ``loader.state_dict()`` before it is loaded, and the per-worker
positions of an iterable dataset's streams.

A state is only meaningful for a loader built like the one that saved it: the
same dataset size, batch size, sampler and ``drop_last`` (and, for an iterable
dataset, the same number of workers: each worker's shard depends on it). ``check``
says what does not match, field by field, before anything changes.

What a state holds (version 2), besides the planner's part (see ``Planner.state``):

* ``delivered``: batches of the epoch already delivered, an int (in order) or the
  list of their batch numbers (``in_order=False``);
* ``sampler``: None, or the own state of a sampler (or batch sampler) that has
  ``state_dict``: ``{"role", "upto", "state", "ended"}``, its state right after
  batch ``upto - 1`` of the epoch was drawn (``ended``: the epoch before the saved
  one, which had just ended);
* ``streams``: None (map-style datasets), or for an iterable dataset
  ``{"num_workers", "workers": [[state, delivered], ...], "exhausted", "last"}``:
  per worker (one stream when ``num_workers=0``) the dataset state after its last
  delivered batch (None when not kept) and how many batches it delivered, the
  workers whose stream had ended, and the worker that delivered last;
* ``counters`` (optional; iterable datasets without a state of their own): the
  dataset's epoch counters in the main process when the saving loader started and
  at the save, to warn at resume when one cannot be restored (see ``_counters``).
"""

from __future__ import annotations

from typing import Any

from .._options import int_from
from ..workers._stateful import stateful

VERSION = 2
_REQUIRED = ("epoch", "delivered", "base_seed", "generators", "global_rng", "private_generator",
             "epochs_set", "states", "sampler", "streams")


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


def sampler_role(loader) -> str | None:
    """Which of the loader's samplers is saved through its own state_dict: the
    batch sampler you gave if it has one, else the sampler if it has one."""
    for role in ("batch_sampler", "sampler"):
        if stateful(getattr(loader, role, None)):
            return role
    return None


class Streams:
    """Where each worker's stream of an iterable dataset stands within the current
    epoch, counted at delivery (workers run ahead of the loop): the state attached to
    the last batch the loop got from it, and how many it got."""

    __slots__ = ("counts", "last", "states", "stops")

    def __init__(self, n: int):
        self.states: list = [None] * n
        self.counts: list = [0] * n
        self.stops: dict = {}  # worker -> lowest batch number it answered "stop" for
        self.last: int | None = None  # the worker that delivered last

    def delivered(self, worker: int, state, ended: bool) -> None:
        """The loop got a batch made by ``worker`` (``state``: None when not kept, which
        also drops a stale one, so a later resume replays by count; ``ended``: it was
        the stream's last)."""
        self.states[worker] = state
        self.counts[worker] += 1
        self.last = worker
        if ended:
            self.stops[worker] = -1

    def stopped(self, worker: int, batch_no: int) -> None:
        """``worker``'s stream ended at ``batch_no``."""
        if batch_no < self.stops.get(worker, batch_no + 1):
            self.stops[worker] = batch_no

    def save(self, num_workers: int, exhausted: list) -> dict:
        """The ``streams`` part of a state."""
        return {"num_workers": num_workers, "workers": [[s, c] for s, c in zip(self.states, self.counts)],
                "exhausted": sorted(exhausted), "last": self.last}

    @classmethod
    def restore(cls, saved: dict) -> Streams:
        """The bookkeeping of a resumed epoch, continuing the saved counts."""
        streams = cls(len(saved["workers"]))
        for w, (state, count) in enumerate(saved["workers"]):
            streams.states[w], streams.counts[w] = state, count
        streams.stops = {w: -1 for w in saved["exhausted"]}  # ended before any batch still to come
        streams.last = saved["last"]
        return streams


def _is_count(value) -> bool:
    return int_from(0)(value)


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
    if not _is_count(state["epoch"]):
        raise ValueError(f"`state['epoch']` must be an int >= 0; got {state['epoch']!r}.")
    if not (_is_count(delivered) or isinstance(delivered, list) and all(map(_is_count, delivered))):
        raise ValueError(f"`state['delivered']` must be an int >= 0 or a list of batch numbers; got {delivered!r}.")
    states = state["states"]
    if not isinstance(states, dict) or not states.keys() <= {"dataset"}:
        keys = list(states) if isinstance(states, dict) else type(states).__name__
        raise ValueError(f"`state['states']` must be a dict holding at most 'dataset'; got {keys!r}.")
    if "dataset" in states and not stateful(loader.dataset):
        raise ValueError(
            f"`state` holds the dataset's own state, but this loader's dataset ({type(loader.dataset).__name__}) "
            "has no state_dict/load_state_dict."
        )
    _check_sampler(state["sampler"], loader)
    _check_streams(state["streams"], loader)
    counters = state.get("counters")  # optional: an iterable dataset's epoch counters (see _counters)
    if counters is not None and not (isinstance(counters, dict) and {"first", "saved"} <= counters.keys()
                                     and all(isinstance(counters[k], dict) for k in ("first", "saved"))):
        raise ValueError(f"`state['counters']` must be a dict with dicts 'first' and 'saved'; got {counters!r}.")


def _check_sampler(sampler: Any, loader) -> None:
    if sampler is None:
        return
    if not isinstance(sampler, dict) or not {"role", "upto", "state", "ended"} <= sampler.keys():
        raise ValueError(f"`state['sampler']` must be None or a dict with role, upto, state, ended; got {sampler!r}.")
    if sampler["role"] not in ("sampler", "batch_sampler") or not _is_count(sampler["upto"]):
        raise ValueError(
            f"`state['sampler']` names role {sampler['role']!r} and upto {sampler['upto']!r}; expected "
            "'sampler' or 'batch_sampler' and an int >= 0."
        )
    role = sampler_role(loader)
    if role != sampler["role"]:
        has = f"its {role} does" if role else "neither its sampler nor its batch_sampler does"
        raise ValueError(
            f"`state` holds the own state of the saving loader's {sampler['role']} (it has state_dict/"
            f"load_state_dict), but in this loader {has}. Build the loader with the same sampler."
        )


def _check_streams(streams: Any, loader) -> None:
    iterable = loader._dataset_kind == 1  # torch's _DatasetKind.Iterable
    if streams is None:
        if iterable:
            raise ValueError("`state['streams']` is None, but this loader's dataset is iterable: "
                             "the state was not saved by a loader of an iterable dataset.")
        return
    if not iterable:
        raise ValueError("`state['streams']` holds the positions of an iterable dataset's streams, "
                         "but this loader's dataset is map-style.")
    if not isinstance(streams, dict) or not {"num_workers", "workers", "exhausted", "last"} <= streams.keys():
        raise ValueError("`state['streams']` must be a dict with num_workers, workers, exhausted, last; "
                         f"got {streams!r}.")
    saved_n, n = streams["num_workers"], loader.num_workers
    if saved_n != n:
        raise ValueError(
            f"`state` was saved by a loader with num_workers={saved_n}; this one has num_workers={n}. An "
            "iterable dataset is sharded by its number of workers (get_worker_info), so each worker's "
            f"position only means something for the same number: build the loader with num_workers={saved_n}."
        )
    workers, count = streams["workers"], max(1, n)
    if (not isinstance(workers, list) or len(workers) != count
            or not all(isinstance(w, (list, tuple)) and len(w) == 2 and _is_count(w[1]) for w in workers)):
        raise ValueError(f"`state['streams']['workers']` must list {count} [state, delivered] pairs; got {workers!r}.")
    bad = [w for w in [*streams["exhausted"], streams["last"]] if w is not None and w not in range(count)]
    if bad or not isinstance(streams["exhausted"], list):
        raise ValueError(f"`state['streams']` names workers {bad or streams['exhausted']!r}; this loader has "
                         f"worker ids 0..{count - 1}.")
