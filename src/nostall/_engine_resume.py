"""The engine's part in ``loader.state_dict()`` / ``load_state_dict()``.

What was delivered (batch numbers, each iterable stream's position, the sampler's
state after the last delivered batch) becomes a small state; loading one makes the
next epoch start right after it. ``_plan`` replays the order, ``_resume`` checks
and holds the per-stream bookkeeping. It works on ``Engine``'s state.
"""

from __future__ import annotations

import copy
import itertools
import warnings

from . import _counters, _resume
from ._plan import EpochPlan
from ._resume import Streams
from ._worker import Resume


class Resuming:
    """Resume methods of ``Engine`` (see the module docstring)."""

    def _track_delivery(self, plan: EpochPlan, key: tuple) -> None:
        """Resume bookkeeping for a delivered batch (iterable datasets, stateful samplers only)."""
        if self._streams is not None:
            self._streams.delivered(*self._made_by.pop(key))
        if plan.sampler_states is not None:  # keep the state after the last delivered batch
            upto = self._deliver_no if self.config.in_order else self._delivered_prefix(plan)
            plan.forget_before(upto - 1)

    def _mark_delivered(self, batch_no: int) -> None:
        """in_order=False: batch ``batch_no`` was delivered. The ledger is a prefix (batches
        0.._prefix-1 all delivered) and the sparse set of those delivered after a gap, so it
        stays as small as the batches delivered out of order, not the epoch."""
        if batch_no != self._prefix:
            self._delivered.add(batch_no)
            return
        self._prefix += 1
        delivered = self._delivered
        while delivered and self._prefix in delivered:
            delivered.remove(self._prefix)
            self._prefix += 1

    def _delivered_list(self) -> list:
        """in_order=False: every batch number delivered this epoch, in order."""
        return [*range(self._prefix), *sorted(self._delivered)]

    def _delivered_prefix(self, plan: EpochPlan) -> int:
        """in_order=False: n such that batches 0..n-1 are all delivered and the sampler
        state after batch n-1 is known (drawn in this run, or the one loaded)."""
        return min(self._prefix, plan.next_batch_no)

    def state_dict(self) -> dict:
        """Where the loop is: the epoch, the batches of it already delivered, and what
        the epoch's order depends on (see ``Planner.state`` and ``_resume``)."""
        plan = self._current
        if plan is None or self._epoch_over:
            return self._state_between(plan)
        if self._inline is not None:  # in-process loading delivers in order
            delivered = upto = plan.next_batch_no
            if plan.skip:  # resumed from an out-of-order save: some later batches came before
                delivered = sorted(set(range(upto)) | plan.skip)
        elif self.config.in_order:
            delivered = upto = self._deliver_no
        else:
            delivered = self._delivered_list()
            upto = self._delivered_prefix(plan)  # a stateful sampler is saved after this prefix
        count = delivered if isinstance(delivered, int) else len(delivered)
        if count == self.planner.epoch_batches():  # all delivered; the loop just did not ask again
            return self._state_between(plan)  # (Lightning stops at len(loader))
        streams = None
        if self._streams is not None:
            pending = {made[0] for made in self._made_by.values()}  # made, not yet delivered
            # A worker whose stream ended with every batch of it delivered sits out the rest.
            exhausted = [w for w in self._streams.stops if w not in pending]
            streams = self._streams.save(self.config.num_workers, exhausted)
            if self._inline is not None and _resume.stateful(self.spec.dataset):
                # In-process loading delivers each batch as it is made: the dataset's state
                # now is the one after the last delivered batch (no copy paid per batch).
                streams["workers"][0][0] = copy.deepcopy(self.spec.dataset.state_dict())
        return dict(self.planner.state(plan, upto), delivered=delivered, streams=streams, **self._counters_state())

    def _state_between(self, finished: EpochPlan | None) -> dict:
        """The state for the start of the epoch after ``finished``."""
        streams = None
        if self.planner.iterable:
            streams = Streams(max(1, self.config.num_workers)).save(self.config.num_workers, [])
        return dict(self.planner.state_of_next(finished), delivered=0, streams=streams, **self._counters_state())

    def _counters_state(self) -> dict:
        """An iterable dataset's epoch counters, for a warning at resume (see ``_counters``)."""
        if not self.planner.iterable or _resume.stateful(self.spec.dataset):
            return {}
        return {"counters": {"first": self._first_counters or {}, "saved": _counters.find(self.spec.dataset)}}

    def load(self, state: dict) -> None:
        """Make the next ``begin_epoch`` continue the saved epoch after its delivered batches."""
        self.planner.restore(state)
        self._resume = state
        self._loaded_counters = state.get("counters")
        if self._loaded_counters is not None:  # the saving run's start is this run's start
            self._first_counters = self._loaded_counters["first"]

    def _skip_delivered(self, plan: EpochPlan, state: dict) -> None:
        """Start the resumed ``plan`` after the batches delivered before the save."""
        delivered, sampler = state["delivered"], state["sampler"]
        if not self.config.in_order:  # a later save lists them too
            if isinstance(delivered, int):
                self._prefix = delivered
            else:
                for batch_no in sorted(delivered):
                    self._mark_delivered(batch_no)
        if self.planner.iterable:
            # Each worker's stream resumes by itself (_begin_streams); batch numbers, which
            # seed the batches, go on from the saved ones.
            plan.next_batch_no = delivered if isinstance(delivered, int) else max(delivered, default=-1) + 1
            self._deliver_no = plan.next_batch_no
        elif sampler is not None and not sampler["ended"]:
            # The sampler continues after batch upto-1 by itself (Planner.restore): pull nothing,
            # number the batches as the uninterrupted run did.
            upto = sampler["upto"]
            plan.next_batch_no = upto
            plan.sampler_states[upto - 1] = sampler["state"]  # saving again at once gives it back
            if isinstance(delivered, int):
                self._deliver_no = delivered
            else:
                plan.skip = frozenset(b for b in delivered if b >= upto)
        elif isinstance(delivered, int):  # in order: the first `delivered` batches, by index only
            for _ in range(delivered):
                if self.planner.pull(plan) is None:
                    break
            self._deliver_no = delivered
        else:
            plan.skip = frozenset(delivered)

    def _begin_streams(self, plan: EpochPlan, saved: dict | None) -> None:
        """Iterable datasets: round-robin over the workers' streams; after a resume,
        each stream starts where the saved run left it (``Resume``), workers whose
        stream had ended sit out, and the round-robin goes on after the last worker."""
        n = self.config.num_workers
        if self._first_counters is None and not _resume.stateful(self.spec.dataset):
            self._first_counters = _counters.find(self.spec.dataset)
        loaded, self._loaded_counters = self._loaded_counters, None
        if loaded is not None and plan.number >= 1:
            lost = _counters.unrestored(loaded["first"], loaded["saved"], _counters.find(self.spec.dataset), n,
                                        callable(getattr(self.spec.dataset, "set_epoch", None)))
            own = _counters.own_state(self.spec.dataset)
            if lost or own:
                warnings.warn(_counters.warning(self.spec.dataset, plan.number, lost, own), UserWarning, stacklevel=4)
        self._streams = Streams(max(1, n)) if saved is None else Streams.restore(saved)
        self._made_by = {}
        ended = set(saved["exhausted"]) if saved is not None else set()
        start = 0 if saved is None or saved["last"] is None else (saved["last"] + 1) % max(1, n)
        self._active = set(range(n)) - ended
        self._rr = itertools.cycle([*range(start, n), *range(start)])
        if saved is None:
            return
        if self._inline is not None and ended:  # in-process: the one stream had ended
            plan.batches = iter(())
            return
        # Each worker (process, or thread of an iterable dataset) holds its own copy.
        own_dataset = (self.pool is None or self.pool.passes_attrs) and _resume.stateful(self.spec.dataset)
        for w, (state, count) in enumerate(saved["workers"]):
            if w in ended:
                continue
            if state is not None and own_dataset:
                msg = Resume(plan.number, state, stream_seed=plan.stream_seed)
            else:
                msg = Resume(plan.number, None, count * self.planner.samples_per_batch(), plan.stream_seed)
            if self._inline is not None:
                self._inline.resume(msg)
                continue
            if self.pool.passes_attrs and self.config.sync_dataset:  # attributes first: they must not overwrite the loaded state
                self._sync_dataset(w, plan)
            self.pool.submit(w, msg)
