"""Which worker makes the next batch, and when a worker should idle for a moment.

Assignment: each batch goes to the worker expected to finish it first (its queue's
expected end plus its own batch cost, learnt from the workers' time stamps), so
batch numbers are made in the order they are delivered and a fast worker is never
left waiting behind a slow one. Until every worker has reported a cost, the
least-loaded worker gets it.

Phases: workers that start together and make batches of equal cost finish
together, round after round: the loop gets n batches at once, then nothing for a
whole batch period, and an epoch boundary that falls between two rounds waits a
whole period. When two workers finish closer together than half the even spacing
(period / n), each worker is told to idle just long enough to take its place on
an even grid; from then on they progress at the same rate and completions
interleave. Idling is only asked for when the workers keep the CPUs busy (their
CPU time per batch, summed, is most of the usable CPUs): then an idle worker's
share goes to the others and costs nothing (a fraction of one batch, once, when
there are no more workers than cores). Workers that mostly wait (remote reads)
are left alone: idling them would cost throughput. It is checked every few
rounds, so slow drift is corrected without steady cost.
"""

from __future__ import annotations

import statistics

from ..observe._cpus import usable_cpus

_CHECK_EVERY_ROUNDS = 4
_SATURATED = 0.75  # share of the usable CPUs the workers must keep busy before idling one is free


class Scheduler:
    """Per-worker load, cost and expected finish time for one pool of ``num_workers``
    sharing ``cpus`` CPUs (default: the CPUs this process may use)."""

    def __init__(self, num_workers: int, cpus: float | None = None) -> None:
        self.load = {w: 0 for w in range(num_workers)}  # tasks submitted, not yet answered
        self._cost: dict[int, float] = {}  # worker -> recent seconds per batch
        self._cpu_share: dict[int, float] = {}  # worker -> recent CPU seconds per second of batch
        self._free_at = {w: 0.0 for w in range(num_workers)}  # when its queue is expected to drain
        self._last_done: dict[int, float] = {}
        self.cpus = usable_cpus().count if cpus is None else cpus
        self.active = set(self.load)  # workers that get new batches (num_workers="auto" changes it)
        self._answers = 0
        self._next_check = 2 * num_workers

    def pick(self, now: float) -> int | None:
        """The worker that should get the next batch."""
        if not self.active:
            return None
        if any(w not in self._cost for w in self.active):
            return min(self.active, key=self.load.__getitem__)
        return min(self.active, key=lambda w: max(self._free_at[w], now) + self._cost[w])

    def add_worker(self, worker_id: int) -> None:
        """A worker started after the pool (num_workers="auto"); not active until made so."""
        self.load.setdefault(worker_id, 0)
        self._free_at.setdefault(worker_id, 0.0)

    def reset(self, worker_id: int) -> None:
        """A new worker took this id: nothing queued, phase unknown (its cost is kept)."""
        self.load[worker_id] = 0
        self._free_at[worker_id] = 0.0
        self._last_done.pop(worker_id, None)

    def costs(self, workers=None, cpu: bool = False) -> list[float]:
        """Recent seconds per batch of ``workers`` (default: all) that reported one;
        with ``cpu``, CPU seconds per batch."""
        return [c * (self._cpu_share[w] if cpu else 1.0) for w, c in self._cost.items()
                if workers is None or w in workers]

    def submitted(self, worker_id: int, now: float) -> None:
        """Record a task sent to ``worker_id``."""
        self.load[worker_id] += 1
        cost = self._cost.get(worker_id)
        if cost is not None:
            self._free_at[worker_id] = max(self._free_at[worker_id], now) + cost

    def answered(self, worker_id: int, started: float, done: float, cpu: float = 0.0) -> dict[int, float]:
        """Record an answer from ``worker_id`` stamped ``started``/``done`` by the worker,
        which spent ``cpu`` seconds of CPU on it.

        Returns ``{worker_id: seconds}`` for workers that should idle that long
        before their next task (usually empty).
        """
        self.load[worker_id] -= 1
        took = done - started
        old = self._cost.get(worker_id)
        cost = self._cost[worker_id] = took if old is None else 0.75 * old + 0.25 * took
        share = min(1.0, cpu / took) if took > 0 else 0.0
        old = self._cpu_share.get(worker_id)
        self._cpu_share[worker_id] = share if old is None else 0.75 * old + 0.25 * share
        self._free_at[worker_id] = done + self.load[worker_id] * cost
        self._last_done[worker_id] = done
        self._answers += 1
        if self._answers < self._next_check or len(self._last_done) < len(self.load):
            return {}
        self._next_check = self._answers + _CHECK_EVERY_ROUNDS * len(self.load)
        pauses = self._spread(done)
        for w, seconds in pauses.items():
            self._free_at[w] += seconds
        return pauses

    def _spread(self, now: float) -> dict[int, float]:
        n = len(self.load)
        period = statistics.median(self._cost.values())
        if period <= 0.0 or len(self.active) != len(self.load) or any(
                now - t > 1.5 * period for t in self._last_done.values()):
            return {}  # someone was idle (the loop is the bottleneck): phases do not matter
        if sum(self._cpu_share.values()) < _SATURATED * self.cpus:
            return {}  # the workers mostly wait: idling one would cost throughput
        first = min(self._last_done.values())
        phase = {w: (t - first) % period for w, t in self._last_done.items()}
        order = sorted(phase, key=phase.__getitem__)
        spacing = period / n
        gaps = [phase[b] - phase[a] for a, b in zip(order, order[1:])]
        gaps.append(period - phase[order[-1]] + phase[order[0]])
        if min(gaps) >= spacing / 2:
            return {}
        pauses = {}
        for k, w in enumerate(order):
            if k * spacing - phase[w] > spacing / 4:
                pauses[w] = k * spacing - phase[w]
        return pauses
