"""num_workers="auto" / prefetch_factor="auto": the tuner's rules, and real loaders using it."""

from __future__ import annotations

import time

import pytest
import torch
from conftest import assert_same_epochs
from toy_datasets import EpochAware, Indexed, SimpleIterable, Sleepy

import nostall
from nostall.control._autotune import RETRY_PERIODS, AutoTuner


def _period(tuner: AutoTuner, now: float, waiting: float, batches_per_s: float, *, cost=0.1, cpu_cost=0.0,
            cpu_used=0.1) -> bool:
    """Feed one control period of 1 s in which the loop waited ``waiting`` of its time
    (its own step is the rest) and a worker spent ``cost`` s (``cpu_cost`` CPU s) per batch."""
    n = int(batches_per_s)
    for _ in range(n):
        tuner.observe(waiting / n, (1 - waiting) / n)
    tuner.period_start = now - 1.0
    return tuner.decide(now, cost, cpu_cost, cpu_used)


def _settle(tuner: AutoTuner, now: float) -> None:
    """The period after a change is not judged (new workers are starting)."""
    assert not _period(tuner, now, 0.5, 10)


def test_grows_towards_the_need_at_most_doubling_then_steps_back():
    t = AutoTuner(max_workers=32, cpu_budget=2, workers=2, tune_prefetch=False)
    assert _period(t, 1, 0.9, 10) and t.workers == 4  # about 12 needed: double
    _settle(t, 1.5)
    assert _period(t, 2, 0.9, 15) and t.workers == 8  # paid off: double again
    _settle(t, 2.5)
    assert _period(t, 3, 0.9, 25) and t.workers == 16
    _settle(t, 3.5)
    assert _period(t, 4, 0.9, 25.5) and t.workers == 8  # 8 more did not pay: back, and no more
    _settle(t, 4.5)
    assert not _period(t, 5, 0.9, 25) and t.workers == 8  # at the ceiling it learnt
    for k in range(RETRY_PERIODS - 2):  # ... until the loop has waited there for RETRY_PERIODS
        _period(t, 6 + k, 0.9, 25)  # periods (counting the one at 4.5)
    assert t.workers == 9  # then it tries one above it
    _settle(t, 14.5)
    assert _period(t, 15, 0.9, 30) and t.workers == 18  # that paid: the limit was wrong, grow again
    assert [d.workers for d in t.decisions] == [4, 8, 16, 8, 9, 18]
    assert "did not raise the rate" in t.decisions[3].reason


def test_the_need_sizes_a_step_and_a_small_gain_counts_when_waiting_was_small():
    t = AutoTuner(max_workers=32, cpu_budget=2, workers=10, tune_prefetch=False)
    # 0.28 s per batch, the loop's step 31 ms: 0.28 / 0.031 * 1.4 -> 13 workers.
    assert _period(t, 1, 0.08, 30, cost=0.28) and t.workers == 13
    _settle(t, 1.5)
    # The rate rose under 5% (waiting 8% could give 8% at most) but the waiting vanished:
    # kept, and 13 is what the loop needs: no probing below it.
    assert not _period(t, 2, 0.0, 30.9, cost=0.3) and t.workers == 13
    # Batches got cheaper (0.17 s): about 8 workers keep up.
    assert _period(t, 3, 0.0, 31, cost=0.17) and t.workers == 8
    assert any("cost per batch changed" in d.reason for d in t.decisions)
    _settle(t, 3.5)
    assert _period(t, 4, 0.03, 30, cost=0.17) and t.workers == 13  # a 3% wait is a loss: back
    assert _period(t, 5, 0.0, 31, cost=0.17) and t.workers == 9  # 8 waited; 9 may not


def test_a_step_is_not_judged_when_the_batches_cost_changed_meanwhile():
    t = AutoTuner(max_workers=32, cpu_budget=2, workers=2, tune_prefetch=False)
    assert _period(t, 1, 0.9, 10, cost=0.1) and t.workers == 4
    _settle(t, 1.5)
    # Batches now take twice as long: the rate fell although the step helped. Not
    # taken back; the loop still waits, so it grows towards the new need.
    assert _period(t, 2, 0.9, 7, cost=0.2) and t.workers == 8
    assert not any("did not raise" in d.reason for d in t.decisions)


def test_shrinks_to_the_need_in_one_step_at_most_half():
    t = AutoTuner(max_workers=32, cpu_budget=2, workers=13)
    assert _period(t, 1, 0.0, 30, cost=0.19) and t.workers == 8  # 0.19 * 30 * 1.4 -> 8
    t = AutoTuner(max_workers=32, cpu_budget=2, workers=16)
    assert _period(t, 1, 0.0, 30, cost=0.01) and t.workers == 8  # at most half at once
    t = AutoTuner(max_workers=32, cpu_budget=2, workers=4)
    assert not _period(t, 1, 0.0, 30, cost=0.12)  # 0.12 * 30 * 1.4 -> 6: all four are needed


def test_computing_workers_are_not_added_beyond_the_cpu_budget():
    t = AutoTuner(max_workers=32, cpu_budget=2, workers=2, tune_prefetch=False)
    assert not _period(t, 1, 0.5, 10, cpu_cost=0.1, cpu_used=1.95)
    # The loop itself uses most of the CPU, but the workers wait on I/O: more help.
    assert _period(t, 2, 0.5, 10, cpu_cost=0.002, cpu_used=1.9) and t.workers == 3


def test_shrinks_when_the_loop_never_waits_and_comes_back_when_it_does():
    t = AutoTuner(max_workers=32, cpu_budget=2, workers=3)
    assert _period(t, 1, 0.0, 10, cost=0.01) and t.workers == 1
    t = AutoTuner(max_workers=32, cpu_budget=2, workers=3)
    assert _period(t, 1, 0.0, 10, cost=0.13) and t.workers == 2
    assert not _period(t, 1.5, 0.2, 8)  # settling
    assert _period(t, 2, 0.2, 8, cost=0.13) and t.workers == 3  # fewer made the loop wait: back
    assert not _period(t, 3, 0.0, 10, cost=0.13) and t.workers == 3  # and it stays


def test_a_larger_window_when_the_loop_waits_on_idle_workers():
    t = AutoTuner(max_workers=32, cpu_budget=2, workers=2, prefetch=2)
    assert _period(t, 1, 0.3, 10) and (t.workers, t.prefetch) == (2, 3)  # workers 50% busy


def test_a_change_of_cost_lets_it_learn_again():
    t = AutoTuner(max_workers=32, cpu_budget=2, workers=2, tune_prefetch=False)
    assert _period(t, 1, 0.9, 10, cost=0.1) and t.workers == 4
    _settle(t, 1.5)
    assert _period(t, 2, 0.9, 10, cost=0.1) and t.workers == 2  # did not pay: back, ceiling 2
    assert not _period(t, 3, 0.9, 10, cost=0.1)
    assert _period(t, 4, 0.9, 10, cost=0.25) and t.workers == 4  # the samples got costlier
    assert any("cost per batch changed" in d.reason for d in t.decisions)


# --------------------------------------------------------------------------- real loaders


@pytest.mark.timeout(120)
def test_auto_grows_on_a_latency_bound_dataset_and_keeps_the_batches():
    dataset = Sleepy(1200, 0.004)  # each sample waits 4 ms, as a remote read would
    kw = dict(batch_size=8, shuffle=True)
    reference = [list(nostall.DataLoader(dataset, generator=torch.Generator().manual_seed(1), **kw))
                 for _ in range(1)]
    with nostall.DataLoader(dataset, num_workers="auto", generator=torch.Generator().manual_seed(1),
                            **kw) as loader:
        assert loader.num_workers_setting == "auto" and type(loader.num_workers) is int
        got = [list(loader)]
        decisions = loader.stats.tuner
        assert loader.num_workers == decisions[-1]["workers"]  # the count in use now
    assert_same_epochs(reference, got)  # tuning never changes a batch
    assert decisions and max(d["workers"] for d in decisions) >= 4
    assert "the loop waits" in decisions[0]["reason"]


@pytest.mark.timeout(120)
def test_auto_shrinks_when_the_training_step_is_the_bottleneck():
    with nostall.DataLoader(Indexed(4000), batch_size=4, num_workers="auto") as loader:
        started = time.monotonic()
        for _ in loader:
            time.sleep(0.02)  # the step, far slower than making a batch
            if loader.stats.tuner and loader.stats.tuner[-1]["workers"] == 1:
                break
            if time.monotonic() - started > 60:
                break
        last = loader.stats.tuner[-1]
    assert last["workers"] == 1 and "would keep up" in last["reason"]


def test_auto_arguments():
    with pytest.raises(ValueError, match="`num_workers='auto'` needs a map-style dataset"):
        nostall.DataLoader(SimpleIterable(10), num_workers="auto")
    # torch's message first (it refuses any prefetch_factor without workers), then nostall's.
    with pytest.raises(ValueError, match=r"^prefetch_factor option could only be specified in multiprocessing.*"
                                         r"\(nostall: prefetch_factor='auto' .* needs num_workers > 0.\)$"):
        nostall.DataLoader(Indexed(10), prefetch_factor="auto")
    with pytest.raises(TypeError, match=r"^'<' not supported between instances of 'str' and 'int' "
                                        r"\(nostall: `num_workers` must be an int >= 0 or 'auto'; got 'many'.\)$"):
        nostall.DataLoader(Indexed(10), num_workers="many")


# --------------------------------------------------------------------------- worker_type="auto"


class SleepyRandom(Sleepy):
    """Waits like a remote read, then draws from torch's global RNG."""

    def __getitem__(self, i):
        return super().__getitem__(i), torch.rand(()).item()


class Busy(Indexed):
    """Pure-Python work holding the GIL, about 1 ms a sample."""

    def __getitem__(self, i):
        x = i
        for k in range(10_000):
            x = (x * 31 + k) % 1_000_003
        return x


class SleepyEpochAware(EpochAware):
    """``ds[i] == i + 1000 * epoch`` after waiting like a remote read."""

    def __getitem__(self, i):
        time.sleep(0.004)
        return super().__getitem__(i)


def _kind_decision(loader) -> dict:
    return next(d for d in loader.stats.tuner if d["worker_type"])


@pytest.mark.timeout(120)
def test_worker_type_auto_chooses_threads_for_waiting_workers_and_keeps_the_batches():
    dataset = Sleepy(400, 0.004)
    kw = dict(batch_size=8, shuffle=True)
    torch_loader = torch.utils.data.DataLoader(dataset, generator=torch.Generator().manual_seed(3), **kw)
    reference = [list(torch_loader) for _ in range(3)]
    with nostall.DataLoader(dataset, num_workers=4, worker_type="auto",
                            generator=torch.Generator().manual_seed(3), **kw) as loader:
        assert loader.worker_type == "auto"
        got = [list(loader) for _ in range(3)]
        decision = _kind_decision(loader)
        assert loader.worker_pids() == []  # the process workers are gone
    assert_same_epochs(reference, got)  # the switch, mid-epoch, changes no batch
    assert decision["worker_type"] == "thread" and "threads" in decision["reason"]
    assert [d for d in loader.stats.tuner if d["workers"] != 4] == []  # a fixed count stays fixed


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dataset, why", [(Busy(3000), "holding the GIL"),
                                          (SleepyRandom(800, 0.004), "global random generators")])
def test_worker_type_auto_keeps_processes_for_cpu_work_or_global_randomness(dataset, why):
    kw = dict(batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(5))
    with nostall.DataLoader(dataset, num_workers="auto", worker_type="auto", **kw) as loader:
        got = [list(loader)]
        decision = _kind_decision(loader)
        assert loader.worker_pids()  # still processes
    assert decision["worker_type"] == "process" and why in decision["reason"]
    kw["generator"] = torch.Generator().manual_seed(5)
    with nostall.DataLoader(dataset, num_workers=2, **kw) as fixed:
        assert_same_epochs([list(fixed)], got)  # global draws are seeded per batch in processes


@pytest.mark.timeout(120)
def test_worker_type_auto_switch_keeps_set_epoch_on_the_dataset():
    """Threads share the user's dataset: epochs prepared ahead for a predicted
    set_epoch are made again after the switch, with the real value."""
    def run(make):
        dataset = SleepyEpochAware(80)
        loader = make(dataset)
        epochs = []
        for epoch in range(8):
            dataset.set_epoch(epoch)
            epochs.append(list(loader))
        return loader, epochs

    kw = dict(batch_size=8, shuffle=True)
    _, reference = run(lambda d: torch.utils.data.DataLoader(d, generator=torch.Generator().manual_seed(2), **kw))
    loader, got = run(lambda d: nostall.DataLoader(d, num_workers=4, worker_type="auto",
                                                   generator=torch.Generator().manual_seed(2), **kw))
    with loader:
        assert _kind_decision(loader)["worker_type"] == "thread"
    assert_same_epochs(reference, got)


def test_worker_type_auto_arguments():
    with pytest.raises(ValueError, match="`worker_type='auto'` needs a map-style dataset"):
        nostall.DataLoader(SimpleIterable(10), num_workers=2, worker_type="auto")
    with pytest.raises(ValueError, match="got num_workers=0"):
        nostall.DataLoader(Indexed(10), worker_type="auto")
