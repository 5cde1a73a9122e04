"""What an epoch delivered, and ``loader.state_dict()`` / ``load_state_dict()``.

``Ledger`` holds the delivery bookkeeping of the current epoch: the next batch
number in order, the batches a worker's stream ended on, the batches delivered
out of order (a prefix and the sparse set after it), each iterable stream's
position, and a loaded state waiting for the next epoch. From it comes a small
state; loading one makes the next epoch start right after it. ``_plan`` replays
the order, ``_resume`` checks and holds the per-stream bookkeeping.
"""

from __future__ import annotations

import copy
import itertools
import warnings

from ..workers import _stateful
from . import _counters
from ._plan import EpochPlan, Planner
from ._resume import Streams
from ..workers._protocol import Resume


class Ledger:
    """One loader's delivery bookkeeping (see the module docstring)."""

    def __init__(self, config, planner: Planner, dataset):
        self.config = config
        self.planner = planner
        self.dataset = dataset
        self.deliver_no = 0  # in_order=True: the next batch number to deliver
        self.skipped: set = set()  # batch numbers an iterable stream ended on (nothing to deliver)
        self.delivered: set = set()  # in_order=False: batches delivered after the prefix (see mark_delivered)
        self.prefix = 0  # in_order=False: batches 0..prefix-1 are all delivered (see delivered_prefix)
        self.epoch_over = False  # the current epoch raised StopIteration
        self.streams: Streams | None = None  # iterable datasets: each worker's position (for resume)
        self.made_by: dict = {}  # iterable datasets: key of a ready batch -> (worker, state, ended)
        self.active: set = set()  # iterable datasets: workers whose stream has not ended
        self.rr = None  # iterable datasets: round-robin over active workers
        self.resume: dict | None = None  # the loaded state, applied by the next begin
        self.first_counters: dict | None = None  # the dataset's epoch counters at the start (see _counters)
        self.loaded_counters: dict | None = None  # those of a loaded state, checked at its first epoch

    def begin(self, plan: EpochPlan) -> dict | None:
        """A new epoch: forget the last one's deliveries; return the loaded state it
        continues (if any), its delivered batches skipped already."""
        self.deliver_no = 0
        self.skipped = set()
        self.epoch_over = False
        self.delivered = set()
        self.prefix = 0
        resume, self.resume = self.resume, None
        if resume is not None:
            self._skip_delivered(plan, resume)
        return resume

    # -- deliveries -------------------------------------------------------------
    def next_in_order(self) -> int:
        """in_order=True: the next batch number to deliver (passing over ended streams' ones)."""
        while self.deliver_no in self.skipped:
            self.skipped.discard(self.deliver_no)
            self.deliver_no += 1
        return self.deliver_no

    def took_in_order(self, plan: EpochPlan, key: tuple) -> None:
        """in_order=True: the batch ``key`` (the next in order) was taken for delivery."""
        self.deliver_no += 1
        if self.streams is not None or plan.sampler_states is not None:
            self._track_delivery(plan, key)

    def took_out_of_order(self, plan: EpochPlan, key: tuple) -> None:
        """in_order=False: the batch ``key`` was taken for delivery."""
        self.mark_delivered(key[1])
        if self.streams is not None or plan.sampler_states is not None:
            self._track_delivery(plan, key)

    def made(self, key: tuple, worker_id: int, result) -> None:
        """Iterable datasets: the ready batch ``key`` was made by ``worker_id`` (for resume)."""
        if self.streams is not None:
            self.made_by[key] = (worker_id, result.state, result.ended)

    def stopped(self, worker_id: int, batch_no: int) -> None:
        """Iterable datasets: ``worker_id``'s stream ended at ``batch_no``."""
        self.active.discard(worker_id)
        self.skipped.add(batch_no)
        self.streams.stopped(worker_id, batch_no)

    def _track_delivery(self, plan: EpochPlan, key: tuple) -> None:
        """Resume bookkeeping for a delivered batch (iterable datasets, stateful samplers only)."""
        if self.streams is not None:
            self.streams.delivered(*self.made_by.pop(key))
        if plan.sampler_states is not None:  # keep the state after the last delivered batch
            upto = self.deliver_no if self.config.in_order else self.delivered_prefix(plan)
            plan.forget_before(upto - 1)

    def mark_delivered(self, batch_no: int) -> None:
        """in_order=False: batch ``batch_no`` was delivered. The ledger is a prefix (batches
        0..prefix-1 all delivered) and the sparse set of those delivered after a gap, so it
        stays as small as the batches delivered out of order, not the epoch."""
        if batch_no != self.prefix:
            self.delivered.add(batch_no)
            return
        self.prefix += 1
        delivered = self.delivered
        while delivered and self.prefix in delivered:
            delivered.remove(self.prefix)
            self.prefix += 1

    def delivered_list(self) -> list:
        """in_order=False: every batch number delivered this epoch, in order."""
        return [*range(self.prefix), *sorted(self.delivered)]

    def delivered_prefix(self, plan: EpochPlan) -> int:
        """in_order=False: n such that batches 0..n-1 are all delivered and the sampler
        state after batch n-1 is known (drawn in this run, or the one loaded)."""
        return min(self.prefix, plan.next_batch_no)

    # -- saving and loading -----------------------------------------------------
    def state_dict(self, plan: EpochPlan | None, inline: bool) -> dict:
        """Where the loop is: the epoch, the batches of it already delivered, and what
        the epoch's order depends on (see ``Planner.state`` and ``_resume``).
        ``inline``: batches are made in this process (``num_workers=0``)."""
        if plan is None or self.epoch_over:
            return self._state_between(plan)
        if inline:  # in-process loading delivers in order
            delivered = upto = plan.next_batch_no
            if plan.skip:  # resumed from an out-of-order save: some later batches came before
                delivered = sorted(set(range(upto)) | plan.skip)
        elif self.config.in_order:
            delivered = upto = self.deliver_no
        else:
            delivered = self.delivered_list()
            upto = self.delivered_prefix(plan)  # a stateful sampler is saved after this prefix
        count = delivered if isinstance(delivered, int) else len(delivered)
        if count == self.planner.epoch_batches():  # all delivered; the loop just did not ask again
            return self._state_between(plan)  # (Lightning stops at len(loader))
        streams = None
        if self.streams is not None:
            pending = {made[0] for made in self.made_by.values()}  # made, not yet delivered
            # A worker whose stream ended with every batch of it delivered sits out the rest.
            exhausted = [w for w in self.streams.stops if w not in pending]
            streams = self.streams.save(self.config.num_workers, exhausted)
            if inline and _stateful.stateful(self.dataset):
                # In-process loading delivers each batch as it is made: the dataset's state
                # now is the one after the last delivered batch (no copy paid per batch).
                streams["workers"][0][0] = copy.deepcopy(self.dataset.state_dict())
        return dict(self.planner.state(plan, upto), delivered=delivered, streams=streams, **self._counters_state())

    def _state_between(self, finished: EpochPlan | None) -> dict:
        """The state for the start of the epoch after ``finished``."""
        streams = None
        if self.planner.iterable:
            streams = Streams(max(1, self.config.num_workers)).save(self.config.num_workers, [])
        return dict(self.planner.state_of_next(finished), delivered=0, streams=streams, **self._counters_state())

    def _counters_state(self) -> dict:
        """An iterable dataset's epoch counters, for a warning at resume (see ``_counters``)."""
        if not self.planner.iterable or _stateful.stateful(self.dataset):
            return {}
        return {"counters": {"first": self.first_counters or {}, "saved": _counters.find(self.dataset)}}

    def load(self, state: dict) -> None:
        """Make the next ``begin`` continue the saved epoch after its delivered batches."""
        self.planner.restore(state)
        self.resume = state
        self.loaded_counters = state.get("counters")
        if self.loaded_counters is not None:  # the saving run's start is this run's start
            self.first_counters = self.loaded_counters["first"]

    def _skip_delivered(self, plan: EpochPlan, state: dict) -> None:
        """Start the resumed ``plan`` after the batches delivered before the save."""
        delivered, sampler = state["delivered"], state["sampler"]
        if not self.config.in_order:  # a later save lists them too
            if isinstance(delivered, int):
                self.prefix = delivered
            else:
                for batch_no in sorted(delivered):
                    self.mark_delivered(batch_no)
        if self.planner.iterable:
            # Each worker's stream resumes by itself (begin_streams); batch numbers, which
            # seed the batches, go on from the saved ones.
            plan.next_batch_no = delivered if isinstance(delivered, int) else max(delivered, default=-1) + 1
            self.deliver_no = plan.next_batch_no
        elif sampler is not None and not sampler["ended"]:
            # The sampler continues after batch upto-1 by itself (Planner.restore): pull nothing,
            # number the batches as the uninterrupted run did.
            upto = sampler["upto"]
            plan.next_batch_no = upto
            plan.sampler_states[upto - 1] = sampler["state"]  # saving again at once gives it back
            if isinstance(delivered, int):
                self.deliver_no = delivered
            else:
                plan.skip = frozenset(b for b in delivered if b >= upto)
        elif isinstance(delivered, int):  # in order: the first `delivered` batches, by index only
            for _ in range(delivered):
                if self.planner.pull(plan) is None:
                    break
            self.deliver_no = delivered
        else:
            plan.skip = frozenset(delivered)

    def begin_streams(self, plan: EpochPlan, saved: dict | None, inline: bool, own_copies: bool) -> list:
        """Iterable datasets: round-robin over the workers' streams; after a resume,
        each stream starts where the saved run left it, workers whose stream had ended
        sit out, and the round-robin goes on after the last worker. Returns the
        ``(worker, Resume)`` messages to send. ``own_copies``: each worker (process, or
        in-process loading) holds its own copy of the dataset."""
        n = self.config.num_workers
        dataset = self.dataset
        if self.first_counters is None and not _stateful.stateful(dataset):
            self.first_counters = _counters.find(dataset)
        loaded, self.loaded_counters = self.loaded_counters, None
        if loaded is not None and plan.number >= 1:
            lost = _counters.unrestored(loaded["first"], loaded["saved"], _counters.find(dataset), n,
                                        callable(getattr(dataset, "set_epoch", None)))
            own = _counters.own_state(dataset)
            if lost or own:
                warnings.warn(_counters.warning(dataset, plan.number, lost, own), UserWarning, stacklevel=4)
        self.streams = Streams(max(1, n)) if saved is None else Streams.restore(saved)
        self.made_by = {}
        ended = set(saved["exhausted"]) if saved is not None else set()
        start = 0 if saved is None or saved["last"] is None else (saved["last"] + 1) % max(1, n)
        self.active = set(range(n)) - ended
        self.rr = itertools.cycle([*range(start, n), *range(start)])
        if saved is None:
            return []
        if inline and ended:  # in-process: the one stream had ended
            plan.batches = iter(())
            return []
        own_dataset = own_copies and _stateful.stateful(dataset)
        messages = []
        for w, (state, count) in enumerate(saved["workers"]):
            if w in ended:
                continue
            if state is not None and own_dataset:
                messages.append((w, Resume(plan.number, state, stream_seed=plan.stream_seed)))
            else:
                messages.append((w, Resume(plan.number, None, count * self.planner.samples_per_batch(),
                                           plan.stream_seed)))
        return messages
