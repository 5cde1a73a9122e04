"""Turning the sampler into numbered batches, one epoch at a time, and one epoch ahead.

When and what nostall draws from random number generators
----------------------------------------------------------
* With ``generator=g``: exactly what torch's DataLoader draws from ``g``, in the
  same order: one int64 (torch's "base seed") when an epoch's iterator is created
  (every epoch, or only the first when you pass ``persistent_workers=True``, as
  torch does), then whatever the sampler draws. Preparing the next epoch early
  draws the same values earlier; if that preparation is thrown away, ``g`` (and
  every ``torch.Generator`` held by the sampler) is rewound. Batches equal torch's
  in every epoch.
* Without a generator (torch's global RNG): at the first ``iter(loader)`` nostall
  draws one int64 from the global RNG (the base seed, as torch does) and the
  sampler draws its first epoch from the global RNG, as torch's does. The first
  epoch therefore equals torch's after ``torch.manual_seed``. For later epochs the
  built-in shuffling sampler draws from a private ``torch.Generator`` seeded with
  the base seed, so preparing epoch N+1 early never touches your global random
  stream. A custom sampler that draws from the global RNG is detected (the global
  state changes while its next epoch is being prepared): the draw is undone and
  nostall stops preparing epochs early for it, with a warning that says to pass it
  a generator.
* Per-batch seeds inside workers derive from (base seed, epoch, batch number) and
  draw nothing.

Epoch state (``set_epoch``)
---------------------------
The next epoch is planned from a prediction of the sampler's and dataset's plain
attributes: an integer attribute that changed by d between the last two epochs is
expected to change by d again (an ``epoch`` attribute of an object with
``set_epoch`` is expected to grow by 1 at first). At ``iter(loader)`` the real
attributes are compared with the prediction; any difference (another
``set_epoch`` value, a replaced sampler, dataset or attribute) discards what was
prepared ahead.

Resume (``loader.state_dict()``)
--------------------------------
A saved epoch is replayed: the generator states it started from, the global RNG
state when its sampler draws from it, the ``set_epoch`` values. Its delivered
batches are then skipped by index (``Engine._skip_delivered``), unless the
sampler (or batch sampler) has ``state_dict``/``load_state_dict``: the state it
depends on may be invisible to nostall (a ``random.Random`` of its own), so
``pull`` records the state of the sampler object each plan iterates after every
batch drawn (batches are drawn ahead of delivery, and the next epoch may be drawn
from a copy of the sampler), the engine saves the one after the last delivered
batch, and ``restore`` loads it into the sampler, which then continues by itself.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch.utils.data import (
    BatchSampler,
    DistributedSampler,
    IterDataPipe,
    RandomSampler,
    SequentialSampler,
    SubsetRandomSampler,
    WeightedRandomSampler,
)

from ..workers import _datapipes, _seeding, _stateful
from . import _resume

_PLAIN = (int, float, bool, str, bytes, type(None))


def object_state(obj) -> dict:
    """Plain attributes by value, other attributes by identity."""
    attrs = getattr(obj, "__dict__", None) or {}
    return {
        name: value if isinstance(value, _PLAIN) else ("<object>", id(value))
        for name, value in attrs.items()
    }


def draws_global_rng(sampler):
    """True/False for torch's own samplers (does iterating it draw from the global
    RNG?), None for a sampler nostall cannot classify (it is then watched instead)."""
    kind = type(sampler)
    if kind is BatchSampler:
        return draws_global_rng(sampler.sampler)
    if kind in (SequentialSampler, DistributedSampler, range, list, tuple):
        return False
    if kind in (RandomSampler, SubsetRandomSampler, WeightedRandomSampler):
        return sampler.generator is None
    return None


def _generators(objs) -> list:
    found = []
    for obj in objs:
        for value in (getattr(obj, "__dict__", None) or {}).values():
            if isinstance(value, torch.Generator) and all(value is not g for g in found):
                found.append(value)
    return found


@dataclass
class EpochPlan:
    """The numbered batches of one epoch, pulled lazily from the sampler."""

    number: int
    assumed: dict  # the sampler/dataset state this plan was made for
    batches: Iterator[Any]
    ahead: bool  # prepared before its iter(); not yet confirmed
    rewind: list = field(default_factory=list)  # (generator, state) to restore if discarded
    watched: bool = False  # pulls made ahead are checked for global-RNG draws
    next_batch_no: int = 0
    exhausted: bool = False
    serial: int = field(default_factory=itertools.count().__next__)  # unique per plan
    waiting_since: float | None = None  # when the loop last saw progress (torch's `timeout`)
    replay: dict = field(default_factory=dict)  # generator states before this plan drew (for resume)
    skip: frozenset = frozenset()  # batch numbers delivered before a resume (in_order=False)
    # A sampler saved through its own state_dict: the object this plan iterates (the
    # user's, or a copy for a predicted epoch) and its state after each batch drawn,
    # by batch number; pruned as batches are delivered (see Engine._track_delivery).
    stateful: Any = None
    sampler_states: dict | None = None
    stream_seed: int | None = None  # an IterDataPipe's shared seed for this epoch (see _datapipes)

    def forget_before(self, batch_no: int) -> None:
        """Drop the sampler states recorded before ``batch_no`` (no longer savable)."""
        states = self.sampler_states
        while states and next(iter(states)) < batch_no:  # recorded in increasing order
            del states[next(iter(states))]


class Planner:
    """Produces :class:`EpochPlan` objects for a loader (see the module docstring)."""

    def __init__(self, loader, *, lookahead: bool, torch_persistent: bool, dataset_in_workers: bool):
        self._loader = loader  # a torch DataLoader: dataset, sampler, batch_sampler, generator
        self.iterable = loader._dataset_kind == 1  # torch's _DatasetKind.Iterable
        self.lookahead = lookahead and not self.iterable
        self._redraw_each_epoch = not torch_persistent
        self.dataset_in_workers = dataset_in_workers  # each worker holds its own copy
        self.base_seed: int | None = None
        self._private: torch.Generator | None = None
        self._builtin_random = isinstance(loader.sampler, RandomSampler) and getattr(
            loader, "_nostall_builtin_sampler", False
        )
        self._pipe_seeds = _datapipes.SeedSource() if isinstance(loader.dataset, IterDataPipe) else None
        self.epoch = -1
        self._restored_global = None  # global RNG state to replay at the next begin() (resume)
        self._ahead: EpochPlan | None = None
        self._states: list = []  # the states seen at the last two iter() calls

    # -- state and prediction -------------------------------------------------
    def _watched(self) -> dict:
        loader = self._loader
        watched = {"dataset": loader.dataset, "sampler": loader.sampler}
        if loader.batch_sampler is not None:
            watched["batch_sampler"] = loader.batch_sampler
            inner = getattr(loader.batch_sampler, "sampler", None)
            if inner is not None and inner is not loader.sampler:
                watched["inner_sampler"] = inner
        return watched

    def _state(self) -> dict:
        return {role: (id(obj), object_state(obj)) for role, obj in self._watched().items()}

    def _predict(self, state: dict) -> dict:
        previous = self._states[-2] if len(self._states) >= 2 else None
        watched = self._watched()
        predicted = {}
        for role, (ident, attrs) in state.items():
            new = dict(attrs)
            before = previous[role][1] if previous and previous[role][0] == ident else None
            for name, value in attrs.items():
                if type(value) is not int:
                    continue
                if before is not None and type(before.get(name)) is int:
                    new[name] = value + (value - before[name])
                elif before is None and name in ("epoch", "_epoch") and hasattr(watched[role], "set_epoch"):
                    new[name] = value + 1
            predicted[role] = (ident, new)
        return predicted

    def _sampler_for(self, predicted: dict, state: dict):
        """The index sampler as it will be in the predicted state (copies, never the user's)."""
        loader = self._loader
        changed = {
            role: {k: v for k, v in predicted[role][1].items() if state[role][1].get(k) != v}
            for role in predicted
        }
        index_sampler = loader._index_sampler
        if not any(changed[r] for r in changed if r != "dataset"):
            return index_sampler

        def patched(obj, role):
            if not changed.get(role):
                return obj
            twin = copy.copy(obj)
            for name, value in changed[role].items():
                setattr(twin, name, value)
            return twin

        if loader.batch_sampler is None:
            return patched(loader.sampler, "sampler")
        batch_sampler = patched(loader.batch_sampler, "batch_sampler")
        inner_role = "inner_sampler" if "inner_sampler" in changed else "sampler"
        inner = getattr(batch_sampler, "sampler", None)
        if inner is not None and changed.get(inner_role):
            if batch_sampler is loader.batch_sampler:
                batch_sampler = copy.copy(batch_sampler)
            batch_sampler.sampler = patched(inner, inner_role)
        return batch_sampler

    # -- plans ------------------------------------------------------------------
    def _draw_epoch_seed(self, number: int) -> None:
        generator = self._loader.generator
        if number == 0 or (generator is not None and self._redraw_each_epoch):
            value = torch.empty((), dtype=torch.int64).random_(generator=generator).item()
            if number == 0:
                self.base_seed = value

    def _draw_seeds(self) -> int | None:
        """Draw the epoch's seeds; for an IterDataPipe return its shared seed. A DataPipe's
        epochs are not prepared ahead, so its draws follow torch's iterator exactly, even
        from the global RNG: shared seed, base seed, and (a new iterator with workers) a
        second shared seed torch leaves unused."""
        if self._pipe_seeds is None:
            self._draw_epoch_seed(self.epoch)
            return None
        generator = self._loader.generator
        seed = self._pipe_seeds.draw(generator)
        if self.epoch == 0 or self._redraw_each_epoch:
            base = torch.empty((), dtype=torch.int64).random_(generator=generator).item()
            if self.epoch == 0:
                self.base_seed = base
            if self._loader.num_workers > 0:
                self._pipe_seeds.draw(generator)
        return seed

    def _batches(self, index_sampler) -> Iterator[Any]:
        if self.iterable:
            return itertools.repeat(self._loader.batch_size)
        return iter(index_sampler)

    def _track_sampler(self, plan: EpochPlan, index_sampler) -> EpochPlan:
        """Have ``pull`` record the state of the stateful sampler ``plan`` iterates."""
        role = None if self.iterable else _resume.sampler_role(self._loader)
        if role == "batch_sampler" or (role == "sampler" and not self._loader._auto_collation):
            plan.stateful = index_sampler
        elif role == "sampler":
            plan.stateful = index_sampler.sampler  # inside torch's BatchSampler (or its copy)
        if plan.stateful is not None:
            plan.sampler_states = {}
        return plan

    def samples_per_batch(self) -> int:
        """Items of an iterable dataset's stream that make one batch."""
        return self._loader.batch_size if self._loader._auto_collation else 1

    def epoch_batches(self) -> int | None:
        """Batches an epoch holds (``len(loader)``), if known."""
        try:
            return None if self.iterable else len(self._loader)
        except TypeError:
            return None

    def epoch_samples(self) -> int | None:
        """Samples an epoch holds (map-style datasets with a sized sampler), else None."""
        if self.iterable:
            return None
        loader = self._loader
        try:
            batch_sampler = loader.batch_sampler
            if batch_sampler is None:
                return len(loader.sampler)
            if isinstance(batch_sampler, BatchSampler):  # the last batch may be short, or dropped
                samples, size = len(batch_sampler.sampler), batch_sampler.batch_size
                return samples - samples % size if batch_sampler.drop_last else samples
            if loader.batch_size:
                return len(batch_sampler) * loader.batch_size
            return len(batch_sampler.sampler)
        except (TypeError, AttributeError):
            return None

    def begin(self) -> EpochPlan:
        """Start the next epoch (called by ``iter(loader)``)."""
        self.epoch += 1
        state = self._state()
        self._states = (self._states + [state])[-2:]
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            if ahead.number == self.epoch and ahead.assumed == state:
                ahead.ahead = False
                return ahead
            self.discard(ahead)
        replay = self._snapshot()
        restored, self._restored_global = self._restored_global, None
        # A resumed epoch replays its global-RNG draws, then the caller's stream is put back.
        with _seeding.saved_global_rng() if restored is not None else contextlib.nullcontext():
            if restored is not None:
                torch.set_rng_state(restored)
            stream_seed = self._draw_seeds()
            index_sampler = self._loader._index_sampler
            plan = self._track_sampler(
                EpochPlan(self.epoch, state, self._batches(index_sampler), ahead=False, replay=replay,
                          stream_seed=stream_seed),
                index_sampler)
            builtin_first = self.epoch == 0 and self._builtin_random and self._loader.generator is None
            if builtin_first or (restored is not None and not self.iterable):
                # Make the first epoch's global draw now, as torch's sampler does on its
                # first batch (samplers draw at their first item).
                first = next(plan.batches, None)
                plan.batches = iter(()) if first is None else itertools.chain([first], plan.batches)
            if builtin_first:  # later epochs shuffle from a private generator
                self._private = torch.Generator().manual_seed(self.base_seed)
                self._loader.sampler.generator = self._private
                self._states[-1] = self._state()  # predictions start from the swapped sampler
        return plan

    def discard_ahead(self) -> None:
        """Forget the plan prepared ahead, if any (it is made again when allowed)."""
        if self._ahead is not None:
            self.discard(self._ahead)

    def discard(self, plan: EpochPlan) -> None:
        """Forget a plan prepared ahead, rewinding every generator it drew from."""
        for generator, saved in plan.rewind:
            generator.set_state(saved)
        if plan is self._ahead:
            self._ahead = None

    # -- resume ---------------------------------------------------------------------
    def _all_generators(self) -> list:
        gens = _generators(self._watched().values())
        if self._loader.generator is not None:
            gens.append(self._loader.generator)
        return gens

    def _snapshot(self) -> dict:
        """What an epoch's order depends on, taken before the epoch draws anything."""
        sampler = self._loader._index_sampler
        draws = draws_global_rng(sampler)
        if self._loader.generator is None and (
                self._pipe_seeds is not None or (self.epoch == 0 and self._builtin_random)):
            draws = True
        return {"generators": [g.get_state() for g in self._all_generators()],
                "global": torch.get_rng_state() if draws is not False else None}

    def state(self, plan: EpochPlan, sampler_upto: int = 0, ended: bool = False) -> dict:
        """The planner's part of ``loader.state_dict()`` for a position in ``plan``:
        ``sampler_upto`` batches of it are behind (see ``_resume`` for ``ended``)."""
        watched = self._watched()
        dataset = watched["dataset"]
        # A map-style dataset's state is the main process's (workers mirror its attributes);
        # an iterable one's is per stream (see Engine), except when loading in-process.
        keep_dataset = _stateful.stateful(dataset) and (not self.iterable or self._loader.num_workers == 0)
        return {
            "epoch": plan.number,
            "base_seed": self.base_seed,
            "private_generator": self._private.get_state() if self._private is not None else None,
            "generators": plan.replay.get("generators", []),
            "global_rng": plan.replay.get("global"),
            "epochs_set": {role: getattr(obj, "epoch") for role, obj in watched.items()
                           if hasattr(obj, "set_epoch") and type(getattr(obj, "epoch", None)) is int},
            "states": {"dataset": dataset.state_dict()} if keep_dataset else {},
            "sampler": self._sampler_state(plan, sampler_upto, ended),
        }

    def _sampler_state(self, plan: EpochPlan, upto: int, ended: bool) -> dict | None:
        """A stateful sampler's state after batch ``upto - 1`` of ``plan`` (None at its start)."""
        if plan.sampler_states is None or upto == 0:
            return None
        return {"role": _resume.sampler_role(self._loader), "upto": upto,
                "state": plan.sampler_states[upto - 1], "ended": ended}

    def state_of_next(self, finished: EpochPlan | None = None) -> dict:
        """``state`` for the start of the next epoch (taken between epochs, after
        ``finished``): a stateful sampler is saved as it was at the end of ``finished``."""
        if self._ahead is not None:
            state = self.state(self._ahead)
        else:
            state = self.state(EpochPlan(self.epoch + 1, {}, iter(()), ahead=False, replay=self._snapshot()))
        if finished is not None:
            state["sampler"] = self._sampler_state(finished, finished.next_batch_no, ended=True)
        return state

    def restore(self, state: dict) -> None:
        """Make the next ``begin()`` replay epoch ``state["epoch"]`` exactly."""
        loader = self._loader
        self.epoch = state["epoch"] - 1
        self.base_seed = state["base_seed"]
        self._ahead = None
        if state["private_generator"] is not None and state["epoch"] >= 1:  # epoch 0 makes its own
            self._private = torch.Generator()
            self._private.set_state(state["private_generator"])
            loader.sampler.generator = self._private
        watched = self._watched()
        sampler = state["sampler"]
        if sampler is not None and sampler["ended"]:
            # Saved between epochs: take the sampler to the end of the epoch that ended
            # (an iteration that yields nothing after its state), so that its next
            # iteration is the following epoch, as in the uninterrupted run.
            getattr(loader, sampler["role"]).load_state_dict(sampler["state"])
            with _seeding.saved_global_rng():
                for _ in loader._index_sampler:
                    pass
        for role, value in state["epochs_set"].items():
            watched[role].set_epoch(value)
        for role, value in state["states"].items():
            watched[role].load_state_dict(value)
        gens = self._all_generators()
        if len(gens) != len(state["generators"]):
            raise ValueError(
                f"the saved state holds {len(state['generators'])} random generator state(s) but this "
                f"loader's sampler and dataset hold {len(gens)}: restore into a loader built the same "
                "way (same sampler, generator= given or not)."
            )
        for gen, saved in zip(gens, state["generators"]):
            gen.set_state(saved)
        if sampler is not None and not sampler["ended"]:
            # After the replayed generators, so that a sampler restoring its own wins; it
            # then continues by itself after the delivered batches (Engine._skip_delivered).
            getattr(loader, sampler["role"]).load_state_dict(sampler["state"])
        self._restored_global = state["global_rng"]
        self._states = [self._state()]

    def plan_ahead(self) -> EpochPlan | None:
        """The next epoch's plan, prepared before its ``iter()``; None when not allowed."""
        if self._ahead is not None:
            return self._ahead
        if not self.lookahead or self.epoch < 0:
            return None
        state = self._states[-1]
        predicted = self._predict(state)
        if predicted["dataset"] != state["dataset"] and not self.dataset_in_workers:
            return None  # we would have to change the user's own dataset object
        gens = _generators(self._watched().values())
        if self._loader.generator is not None:
            gens.append(self._loader.generator)
        rewind = [(g, g.get_state()) for g in gens]
        index_sampler = self._sampler_for(predicted, state)
        draws = draws_global_rng(index_sampler)
        if draws:
            self.stop_lookahead()
            return None
        with _GlobalGuard(self, active=draws is None) as guard:
            self._draw_epoch_seed(self.epoch + 1)
            batches = self._batches(index_sampler)
        if guard.touched:
            for generator, saved in rewind:
                generator.set_state(saved)
            return None
        self._ahead = self._track_sampler(EpochPlan(
            self.epoch + 1, predicted, batches, ahead=True, rewind=rewind, watched=draws is None,
            replay={"generators": [saved for _, saved in rewind], "global": None},
        ), index_sampler)
        return self._ahead

    def pull(self, plan: EpochPlan):
        """Next batch of indices of ``plan`` as ``(batch_no, indices)``, or None at its end."""
        if plan.ahead and plan.watched:
            with _GlobalGuard(self) as guard:
                indices = next(plan.batches, _END)
            if guard.touched:
                self.discard(plan)
                plan.exhausted = True
                return None
        else:
            indices = next(plan.batches, _END)
        if indices is _END:
            plan.exhausted = True
            return None
        batch_no = plan.next_batch_no
        plan.next_batch_no += 1
        if plan.stateful is not None:  # a copy: the sampler's own dict goes on changing
            plan.sampler_states[batch_no] = copy.deepcopy(plan.stateful.state_dict())
        return batch_no, indices

    def stop_lookahead(self) -> None:
        """The sampler draws from the global RNG: prepare no epoch early from now on."""
        self.lookahead = False
        warnings.warn(
            "nostall: the sampler draws from the global random number generator, so the "
            "next epoch cannot be prepared while this one finishes without changing your "
            "random stream; epochs will start only at iter(loader) (a short pause). Pass "
            "the sampler a `generator=torch.Generator()` to remove the pause.",
            stacklevel=5,
        )


_END = object()


class _GlobalGuard:
    """Undo any global-RNG draw made while preparing an epoch early, and stop doing so.

    Only samplers nostall cannot classify are watched; thread workers drawing from
    the global RNG at the same moment would look like the sampler drawing.
    """

    def __init__(self, planner: Planner, active: bool = True):
        self.planner = planner
        self.active = active
        self.touched = False

    def __enter__(self):
        if self.active:
            self._saved = _seeding.saved_global_rng().__enter__()
            self._before = _seeding.global_rng_fingerprint()
        return self

    def __exit__(self, *exc):
        if self.active and _seeding.global_rng_fingerprint() != self._before:
            self.touched = True
            self._saved.__exit__(None, None, None)
            self.planner.stop_lookahead()
        return False
