"""The worker factory is no single point of failure: SIGKILL it (as the out-of-memory
killer may: it holds the dataset) and the loader starts a new one, restarts the workers
that died with it and delivers the same batches, each exactly once; a factory that keeps
dying with no batch delivered ends the loader with a clear error; and no process or
zombie of the loader is left once it is closed. Real processes and signals throughout."""

from __future__ import annotations

import gc
import os
import select
import signal
import warnings

import psutil
import pytest
import torch
import torch.utils.data as tud
from conftest import flat_indices
from toy_datasets import Indexed, RandomValues

import nostall
import nostall.workers._pool

METHODS = ["fork", "spawn"]


@pytest.fixture(autouse=True)
def every_worker_from_the_factory(monkeypatch):
    """Under fork the first workers are forked by the loader's process itself and the
    factory starts with the first replacement; the tests that SIGKILL the factory from
    the first batch on have every worker made by it (the tests at the end of this file
    cover the loader's own workers)."""
    monkeypatch.setattr(nostall.workers._pool, "FORK_FIRST_WORKERS", False)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def factory_pid(loader) -> int:
    """The factory is the parent of every worker (found as a user would, with ps)."""
    parents = {psutil.Process(pid).ppid() for pid in loader.worker_pids()}
    assert len(parents) == 1 and os.getpid() not in parents, parents
    return parents.pop()


def kill_factory(loader) -> tuple[int, list]:
    """SIGKILL the loader's factory and wait until its workers have ended (the kernel
    kills them once the factory's exit completes): from then on the loader must notice,
    however fast the dataset is. Returns the factory's pid and the workers' pids."""
    return _kill_and_wait(factory_pid(loader), loader.worker_pids())


def zombies_and_children() -> tuple[list, list]:
    """This process's zombie descendants, and its live ones other than multiprocessing's
    own helpers (the resource tracker that spawn starts once per interpreter)."""
    zombies, live = [], []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                zombies.append(p.pid)
            elif "resource_tracker" not in " ".join(p.cmdline()):
                live.append(p.pid)
        except psutil.NoSuchProcess:
            pass
    return zombies, live


def still_running(pids) -> list:
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", METHODS)
def test_factory_sigkill_mid_epoch_keeps_torchs_batches_exactly_once(method):
    """SIGKILL the factory after the first batch of epoch 0 and again (the new one)
    after the 6th batch of epoch 1: both epochs deliver torch's batches, each once."""
    dataset = Indexed(240)
    kw = dict(batch_size=8, shuffle=True, num_workers=2)
    torch_loader = tud.DataLoader(dataset, generator=_gen(), **kw)
    expected = [[b.tolist() for b in torch_loader] for _ in range(2)]

    killed = []
    workers_before = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loader = nostall.DataLoader(dataset, generator=_gen(), multiprocessing_context=method, **kw)
        got = []
        for epoch, after in ((0, 1), (1, 6)):
            batches = []
            for batch in loader:
                batches.append(batch.tolist())
                if len(batches) == after:
                    pid, workers = kill_factory(loader)
                    assert pid not in killed  # a new factory each time
                    killed.append(pid)
                    workers_before += workers
            got.append(batches)
        restarts = loader.stats.restarts
        new_workers = loader.worker_pids()
        loader.close()

    assert got == expected
    for epoch in got:
        assert sorted(flat_indices(epoch)) == list(range(240))  # every index exactly once
    factory_lines = [r for r in restarts if r.startswith("the nostall worker factory")]
    assert factory_lines == [f"the nostall worker factory (pid {pid}) was killed by SIGKILL" for pid in killed], restarts
    worker_lines = [r for r in restarts if r.startswith("nostall worker")]
    assert len(worker_lines) == 4  # both workers, twice
    assert all("because the nostall worker factory" in r for r in worker_lines)
    said = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert any("(and a new worker factory)" in m and "unfinished batch(es) again" in m for m in said), said
    assert not set(new_workers) & set(workers_before)
    assert still_running(killed + workers_before + new_workers) == []
    assert zombies_and_children() == ([], [])


@pytest.mark.timeout(120)
def test_factory_sigkill_keeps_random_batches_bitwise():
    """Samples that draw random numbers: a run whose factory is SIGKILLed twice in an
    epoch delivers the very tensors of an undisturbed run (per-batch seeding)."""
    dataset = RandomValues(160)
    kw = dict(batch_size=4, shuffle=True, num_workers=2)
    with nostall.DataLoader(dataset, generator=_gen(3), **kw) as loader:
        expected = [list(loader) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with nostall.DataLoader(dataset, generator=_gen(3), **kw) as loader:
            got = []
            for _ in range(2):
                batches = []
                for batch in loader:
                    batches.append(batch)
                    if len(batches) in (3, 25):
                        kill_factory(loader)
                got.append(batches)
            assert len([r for r in loader.stats.restarts if "factory (pid" in r and r.startswith("the")]) == 4
    for e_epoch, g_epoch in zip(expected, got):
        assert len(e_epoch) == len(g_epoch) == 40
        for e, g in zip(e_epoch, g_epoch):
            for key in e:
                assert torch.equal(torch.as_tensor(e[key]), torch.as_tensor(g[key])), key


class KillsItsFactory(Indexed):
    """Every sample SIGKILLs the process that forked its worker, the factory: no batch can
    ever be delivered. (Only a process whose own parent is the loader's process is killed.)"""

    def __init__(self, n: int):
        super().__init__(n)
        self.main_pid = os.getpid()

    def __getitem__(self, i):
        parent = os.getppid()
        try:
            ours = psutil.Process(parent).ppid() == self.main_pid
        except psutil.NoSuchProcess:
            ours = False
        if not ours:  # the factory is gone already (another worker killed it)
            os._exit(1)
        os.kill(parent, signal.SIGKILL)
        while True:  # until the kernel's SIGKILL: a factory's workers die with it
            signal.pause()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", METHODS)
def test_factory_killed_again_and_again_without_progress_raises(method):
    """A factory that dies every time, with no batch delivered in between, is given up
    after max_worker_restarts (one failure per factory, however many workers it took),
    with an error that says so; not a hang, and nothing is left running."""
    loader = nostall.DataLoader(KillsItsFactory(64), batch_size=8, num_workers=2, multiprocessing_context=method)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(RuntimeError) as err:
            next(iter(loader))
    text = str(err.value)
    assert text.startswith("DataLoader worker (pid ")  # torch's sentence first
    assert "because the nostall worker factory (pid " in text and "was killed by SIGKILL" in text
    assert "4 worker failures in a row with no batch delivered in between, more than max_worker_restarts=3" in text
    assert "The loader was closed" in text
    factories = [r for r in loader.stats.restarts if r.startswith("the nostall worker factory")]
    assert len(factories) == 4
    assert loader.worker_pids() == []
    assert zombies_and_children() == ([], [])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", METHODS)
def test_no_zombie_or_child_after_close(method):
    """After close(), after the last epoch of non-persistent workers, and after the loader
    is dropped, nothing of the loader is left: no process, no zombie (spawn's factory is a
    child of this process and must be reaped); the same after a factory was replaced."""
    dataset = Indexed(64)
    kw = dict(batch_size=8, num_workers=2, multiprocessing_context=method)

    loader = nostall.DataLoader(dataset, **kw)
    it = iter(loader)
    next(it)
    loader.close()
    assert zombies_and_children() == ([], [])

    loader = nostall.DataLoader(dataset, persistent_workers=False, **kw)
    assert len(list(loader)) == 8
    assert zombies_and_children() == ([], [])

    loader = nostall.DataLoader(dataset, **kw)
    next(iter(loader))
    del loader
    gc.collect()
    assert zombies_and_children() == ([], [])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        loader = nostall.DataLoader(dataset, **kw)
        it = iter(loader)
        next(it)
        first, _ = kill_factory(loader)
        assert len(list(it)) == 7
        assert factory_pid(loader) != first
        loader.close()
    assert zombies_and_children() == ([], [])


# --------------------------------------------------------------------------- fork: the first workers are the loader's own


def _ppid(pid: int) -> int:
    return psutil.Process(pid).ppid()




@pytest.mark.timeout(120)
def test_fork_first_workers_are_the_loaders_children_and_the_factory_starts_on_demand(monkeypatch):
    """Under fork the first workers are forked straight from the loader's process, as
    torch's are (no factory in between on the way to the first batch); a replacement
    comes from a factory started for it. Batches match torch's; close() leaves nothing."""
    monkeypatch.setattr(nostall.workers._pool, "FORK_FIRST_WORKERS", True)
    dataset = Indexed(96)
    kw = dict(batch_size=8, shuffle=True, num_workers=2)
    torch_loader = tud.DataLoader(dataset, generator=_gen(), **kw)
    expected = [[b.tolist() for b in torch_loader] for _ in range(2)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loader = nostall.DataLoader(dataset, generator=_gen(), multiprocessing_context="fork", **kw)
        it = iter(loader)
        got = [next(it).tolist()]
        pool = loader._engine.pool
        first = loader.worker_pids()
        assert [_ppid(p) for p in first] == [os.getpid()] * 2
        assert pool.factory_pid is None
        _kill_and_wait(first[0])
        got += [b.tolist() for b in it]
        second = [b.tolist() for b in loader]
        pids = loader.worker_pids()
        factory = pool.factory_pid
        assert factory is not None and _ppid(factory) == os.getpid()
        new = (set(pids) - {first[1]}).pop()
        assert _ppid(new) == factory
        restarts = loader.stats.restarts
        loader.close()
    assert [got, second] == expected
    assert first[1] in pids and first[0] not in pids  # worker 1 lives on; worker 0 was replaced
    assert len(restarts) == 1 and restarts[0].startswith(f"nostall worker 0 (pid {first[0]}) was killed by SIGKILL")
    said = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert not any("worker factory" in m for m in said), said
    assert still_running([factory, new, *first]) == []
    assert zombies_and_children() == ([], [])


@pytest.mark.timeout(120)
def test_factory_death_spares_the_loaders_own_workers(monkeypatch):
    """Under fork, SIGKILL the factory (started for a replacement): only the workers it
    made die with it and are replaced; the loader's own worker keeps its pid; torch's
    batches, each once; nothing left after close()."""
    monkeypatch.setattr(nostall.workers._pool, "FORK_FIRST_WORKERS", True)
    dataset = Indexed(160)
    kw = dict(batch_size=8, shuffle=True, num_workers=2)
    expected = [b.tolist() for b in tud.DataLoader(dataset, generator=_gen(), **kw)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        loader = nostall.DataLoader(dataset, generator=_gen(), multiprocessing_context="fork", **kw)
        got = []
        killed = None
        for batch in loader:
            got.append(batch.tolist())
            if len(got) == 1:
                own = loader.worker_pids()
                _kill_and_wait(own[0])
            if killed is None and loader._engine.pool.factory_pid is not None and len(loader.worker_pids()) == 2:
                made = [p for p in loader.worker_pids() if p != own[1]]
                assert [_ppid(p) for p in made] == [loader._engine.pool.factory_pid]
                killed, _ = kill_factory_of(loader, made)
        assert killed is not None
        restarts = loader.stats.restarts
        pids = loader.worker_pids()
        loader.close()
    assert got == expected
    assert own[1] in pids  # the loader's own worker was not touched
    assert any(r == f"the nostall worker factory (pid {killed}) was killed by SIGKILL" for r in restarts), restarts
    lost = [r for r in restarts if "because the nostall worker factory" in r]
    assert len(lost) == 1 and lost[0].startswith("nostall worker 0 "), restarts
    assert still_running([killed, *own, *pids]) == []
    assert zombies_and_children() == ([], [])


def kill_factory_of(loader, workers) -> tuple[int, list]:
    """SIGKILL the factory and wait until ``workers`` (the ones it made) have ended."""
    return _kill_and_wait(loader._engine.pool.factory_pid, workers)


def _kill_and_wait(pid: int, workers: list | None = None) -> tuple[int, list]:
    """SIGKILL ``pid``; return once ``workers`` (default: ``pid`` itself) have ended."""
    fds = [os.pidfd_open(w) for w in (workers if workers is not None else [pid])]
    try:
        os.kill(pid, signal.SIGKILL)
        for fd in fds:
            assert select.select([fd], [], [], 30.0)[0], f"a process outlived the SIGKILL of {pid} by 30 s"
    finally:
        for fd in fds:
            os.close(fd)
    return pid, workers


@pytest.mark.timeout(60)
def test_fork_loader_on_another_thread_forks_through_the_factory(monkeypatch):
    """PR_SET_PDEATHSIG follows the thread that forked: a loader started on another
    thread has its workers made by the factory (they die with the process, not the thread)."""
    import threading

    monkeypatch.setattr(nostall.workers._pool, "FORK_FIRST_WORKERS", True)
    out = {}

    def run():
        with nostall.DataLoader(Indexed(32), batch_size=8, num_workers=2, multiprocessing_context="fork") as loader:
            out["batches"] = [b.tolist() for b in loader]
            out["parents"] = {_ppid(p) for p in loader.worker_pids()}
            out["factory"] = loader._engine.pool.factory_pid

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(50)
    assert len(out["batches"]) == 4
    assert out["parents"] == {out["factory"]} and out["factory"] != os.getpid()
    assert zombies_and_children() == ([], [])
