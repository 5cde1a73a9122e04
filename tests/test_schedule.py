"""The scheduler: who gets the next batch, and when workers idle to spread their phases."""

from __future__ import annotations

import pytest

from nostall.core._schedule import Scheduler


def _answer(s: Scheduler, w: int, started: float, done: float) -> dict:
    return s.answered(w, started, done)


def test_least_loaded_until_every_worker_has_a_cost():
    s = Scheduler(3)
    s.submitted(0, 0.0)
    s.submitted(0, 0.0)
    s.submitted(1, 0.0)
    assert s.pick(0.0) == 2
    _answer(s, 0, 0.0, 1.0)  # worker 0 has a cost now, the others not yet
    assert s.pick(1.0) == 2


def test_expected_finish_prefers_the_faster_worker():
    s = Scheduler(2)
    for w in (0, 1):
        s.submitted(w, 0.0)
    _answer(s, 0, 0.0, 0.1)  # worker 0: 0.1 s per batch
    _answer(s, 1, 0.0, 1.0)  # worker 1: 1.0 s per batch
    picks = []
    for _ in range(12):
        w = s.pick(1.0)
        s.submitted(w, 1.0)
        picks.append(w)
    # Worker 0 finishes nine more batches before worker 1 could finish one.
    assert picks[:9] == [0] * 9 and picks.count(1) == 1


def _warm_up(s: Scheduler, n: int, period: float, phases: list[float], cpu_share: float = 1.0) -> dict:
    """Every worker makes batches of ``period`` seconds (``cpu_share`` of it on the
    CPU) at the given phases; return the pauses asked at the first check."""
    t = 10.0
    asked = {}
    for round_no in range(3):
        for w in range(n):
            s.submitted(w, 0.0)
        for w in sorted(range(n), key=lambda w: phases[w]):
            done = t + round_no * period + phases[w]
            asked.update(s.answered(w, done - period, done, cpu_share * period))
    return asked


@pytest.mark.parametrize("n", [2, 4, 8])
def test_workers_in_lockstep_are_spread_over_one_period(n):
    period = 0.24
    pauses = _warm_up(Scheduler(n, cpus=2), n, period, [0.0] * n)
    assert len(pauses) == n - 1  # one leader keeps going
    assert sorted(pauses.values()) == pytest.approx([k * period / n for k in range(1, n)])


def test_spread_phases_are_left_alone():
    n, period = 4, 0.2
    assert _warm_up(Scheduler(n, cpus=2), n, period, [k * period / n for k in range(n)]) == {}


@pytest.mark.parametrize("n", [2, 8])
def test_workers_that_mostly_wait_are_not_idled(n):
    # Remote reads: 5% CPU each. Idling one would lose its throughput, not lend it.
    assert _warm_up(Scheduler(n, cpus=2), n, 0.3, [0.0] * n, cpu_share=0.05) == {}


def test_no_spreading_when_a_worker_was_idle():
    # Worker 1 last finished long ago: the loop, not the workers, sets the pace.
    s = Scheduler(2)
    for w in (0, 1):
        s.submitted(w, 0.0)
        s.submitted(w, 0.0)
    s.answered(1, 0.0, 0.1)
    s.answered(1, 0.1, 0.2)
    s.answered(0, 0.0, 0.1)
    assert s.answered(0, 4.9, 5.0) == {}


def test_death_notice_only_releases_the_load():
    s = Scheduler(2)
    s.submitted(0, 0.0)
    assert s.answered(0, 0.0, 0.0) == {}
    assert s.load == {0: 0, 1: 0}
