"""Start-up: what iter() hands to the workers, compared with torch's DataLoader, and
what the loader does (and no longer does) before the first batch."""

from __future__ import annotations

import os
import warnings

import psutil
import pytest
import torch
from torch.utils.data import Dataset

import nostall
from nostall.core import _engine as engine_module
from nostall.observe._cpus import usable_cpus
from nostall.observe._memory import proc_descendants


class Squares(Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        return torch.tensor([i * i])


def _loader(cls, workers, **kw):
    g = torch.Generator()
    g.manual_seed(3)
    return cls(Squares(), batch_size=4, shuffle=True, num_workers=workers, generator=g,
               multiprocessing_context="fork", persistent_workers=True, **kw)


def _cpus() -> int:
    return max(1, int(usable_cpus().count))


def test_iter_hands_out_the_first_batches_as_torch_does():
    workers = _cpus()
    ref = _loader(torch.utils.data.DataLoader, workers)
    loader = _loader(nostall.DataLoader, workers)
    try:
        ref_it, it = iter(ref), iter(loader)
        # Both have a full window with the workers before the first next().
        assert len(loader._engine._inflight) == ref_it._tasks_outstanding == 2 * workers
        assert [b.tolist() for b in it] == [b.tolist() for b in ref_it]
    finally:
        loader.close()
        ref._iterator._shutdown_workers()


@pytest.mark.timeout(60)
def test_first_batches_go_to_no_more_workers_than_cpus():
    cpus = _cpus()
    workers = cpus + 2
    ref = _loader(torch.utils.data.DataLoader, workers)
    loader = _loader(nostall.DataLoader, workers)
    try:
        ref_it, it = iter(ref), iter(loader)
        assert ref_it._tasks_outstanding == 2 * workers  # torch: every worker at once
        # nostall: one batch per CPU until the first one returns, so it is not made on a
        # core shared with every other worker; then the whole window.
        assert len(loader._engine._inflight) == cpus
        first = next(it)
        assert loader._engine._occupancy() == 2 * workers  # the whole window once it is back
        assert [first.tolist(), *(b.tolist() for b in it)] == [b.tolist() for b in ref_it]
    finally:
        loader.close()
        ref._iterator._shutdown_workers()


class ManyRows(Dataset):
    def __init__(self):
        self.rows = [{"label": i % 10} for i in range(300_000)]

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return self.rows[i]["label"]


def test_copy_on_read_warning_points_at_iter(monkeypatch):
    monkeypatch.setattr(engine_module, "_warned_copy_on_read", False)
    with nostall.DataLoader(ManyRows(), batch_size=4, num_workers=2, multiprocessing_context="fork") as loader:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            it = iter(loader)  # the line the warning names
            line = __import__("inspect").currentframe().f_lineno - 1
        assert len(loader._engine._inflight) == 4  # the workers had their batches first
        assert list(it)
    [w] = [w for w in caught if "nostall.flat" in str(w.message)]
    assert (w.filename, w.lineno) == (__file__, line)


@pytest.mark.timeout(60)
def test_memory_figures_without_a_sample_at_start():
    with nostall.DataLoader(Squares(), batch_size=4, num_workers=2, multiprocessing_context="fork") as loader:
        it = iter(loader)
        memory = loader._recorder.memory
        assert memory.samples == 0  # iter() took none (a sample walks the whole address space)
        pids = loader.worker_pids()
        assert set(pids) <= set(proc_descendants(os.getpid()))
        assert set(proc_descendants(os.getpid())) == {p.pid for p in psutil.Process().children(recursive=True)}
        assert loader.stats.peak_memory_mb > 10  # read before the first sample: one is taken now
        list(it)
    assert memory.samples >= 2 and memory.peak_processes >= 1 + 2  # the last one saw the workers (fork: no factory before a replacement)
