"""The engine against an in-memory pool (tests/inmemory_pool.py): the real engine, the real
BatchMaker and ``serve`` loop, no processes, no threads, no pipes. What these tests check
is the engine's side of the worker protocol (``nostall.workers._protocol``)."""

from __future__ import annotations

import warnings

import pytest
import torch
from inmemory_pool import InMemoryPool, use_inmemory_pool
from toy_datasets import Indexed

import nostall
from nostall.workers._protocol import PipeOnly, Result, Task, TransportFallback, WorkerPool


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _torch_epochs(dataset, epochs: int, **kw) -> list:
    loader = torch.utils.data.DataLoader(dataset, generator=_gen(), **kw)
    return [[b.tolist() for b in loader] for _ in range(epochs)]


def _epochs(loader, epochs: int) -> list:
    return [[b.tolist() for b in loader] for _ in range(epochs)]


def test_inmemory_pool_implements_the_protocol():
    """Every member ``WorkerPool`` declares, the pools have (the process and thread pools too)."""
    from nostall.workers._pool import ProcessPool, ThreadPool

    members = [m for m in (*WorkerPool.__annotations__, *vars(WorkerPool)) if not m.startswith("_")]
    assert {"submit", "poll", "close", "restart", "uses_shm", "exits"} <= set(members)
    for cls in (InMemoryPool, ProcessPool, ThreadPool):
        for name in members:
            if name in WorkerPool.__annotations__ and not hasattr(cls, name):
                continue  # an instance attribute: checked on an instance below
            assert hasattr(cls, name), (cls.__name__, name)
    loader = nostall.DataLoader(Indexed(8), batch_size=2, num_workers=2)
    pools = use_inmemory_pool(loader)
    next(iter(loader))
    for name in WorkerPool.__annotations__:
        assert hasattr(pools[0], name), name
    loader.close()


@pytest.mark.timeout(60)
def test_batches_equal_torchs_over_two_shuffled_epochs():
    dataset = Indexed(100)
    kw = dict(batch_size=8, shuffle=True)
    expected = _torch_epochs(dataset, 2, **kw)
    with nostall.DataLoader(dataset, generator=_gen(), num_workers=3, **kw) as loader:
        pools = use_inmemory_pool(loader)
        got = _epochs(loader, 2)
    assert got == expected
    assert len(pools) == 1 and pools[0].closed  # one persistent pool, closed with the loader
    made = sorted((epoch, batch_no) for _, epoch, batch_no in pools[0].made)
    assert made[:26] == [(e, b) for e in (0, 1) for b in range(13)]  # each batch made once
    assert {w for w, _, _ in pools[0].made} == {0, 1, 2}  # by every worker


@pytest.mark.timeout(60)
def test_a_worker_death_mid_epoch_resends_its_batches_each_arrives_once_in_order():
    dataset = Indexed(100)
    kw = dict(batch_size=4, shuffle=True)
    expected = _torch_epochs(dataset, 2, **kw)
    with nostall.DataLoader(dataset, generator=_gen(), num_workers=3, **kw) as loader:
        pools = use_inmemory_pool(loader, die_on_task={1: 4})  # worker 1 dies taking its 4th task
        with pytest.warns(RuntimeWarning, match=r"nostall worker 1 \(pid None\) was killed by SIGKILL while "
                                                r"making batch \d+ of epoch 0 .*sent its \d+ unfinished batch"):
            got = _epochs(loader, 2)
        restarts = list(loader.stats.restarts)
    assert got == expected  # every batch once, in order: nothing lost, nothing twice
    pool = pools[0]
    assert pool.starts[1] == 2 and pool.starts[0] == pool.starts[2] == 1
    assert len(restarts) == 1 and "killed by SIGKILL" in restarts[0]
    # The batch it died on was made again (by some worker) after its death.
    made = [(e, b) for _, e, b in pool.made]
    assert sorted(set(made)) == sorted(made)  # the dead worker had made none of its lost batches
    assert len([1 for w, e, _ in pool.made if w == 1 and e == 0]) >= 3


def _raise_in_worker_1(worker_id: int) -> None:
    if worker_id == 1:
        raise ValueError("cannot open the shard index")


@pytest.mark.timeout(60)
def test_a_start_failure_raises_what_the_process_pool_raises():
    dataset = Indexed(16)
    with nostall.DataLoader(dataset, batch_size=4, num_workers=2, worker_init_fn=_raise_in_worker_1) as loader:
        with pytest.raises(Exception) as real:
            list(loader)
    loader = nostall.DataLoader(dataset, batch_size=4, num_workers=2)
    use_inmemory_pool(loader, fail_start={1: ValueError("cannot open the shard index")})
    with pytest.raises(Exception) as fake:
        list(loader)
    assert type(fake.value) is type(real.value) is ValueError
    first = str(real.value).splitlines()[0]
    assert first == "Caught ValueError in DataLoader worker process 1."
    assert str(fake.value).splitlines()[0] == first
    for error in (real.value, fake.value):
        assert "ValueError: cannot open the shard index" in str(error)
        assert "while starting (worker_init_fn)" in str(error)
    with pytest.raises(RuntimeError, match="was closed"):  # both close the loader
        iter(loader)


@pytest.mark.timeout(60)
def test_transport_fallback_switches_every_worker_to_the_pipe():
    """A TransportFallback from one worker: one warning naming it, PipeOnly to every worker."""
    dataset = Indexed(64)
    with nostall.DataLoader(dataset, batch_size=4, num_workers=2) as loader:
        pools = use_inmemory_pool(loader)
        it = iter(loader)
        first = next(it)
        pool = pools[0]
        assert not any(m.no_shm for m in pool.makers().values())
        pool.report(0, TransportFallback("No space left on device"))
        with pytest.warns(RuntimeWarning, match=r"worker 0 could not put a batch in /dev/shm \(No space left"):
            rest = list(it)
        assert all(m.no_shm for m in pool.makers().values())  # each worker's serve() handled its PipeOnly
    assert torch.cat([first, *rest]).tolist() == list(range(64))


def test_serve_answers_each_message_type():
    """``serve`` is the loop of both kinds of worker: a PipeOnly is handled, not passed to make."""
    from nostall.workers import _worker
    from nostall.workers._protocol import Pause, SetAttrs, Stop

    dataset = Indexed(8)
    spec = _worker.WorkSpec(dataset, iterable=False, auto_collation=True,
                            collate_fn=torch.utils.data.default_collate, drop_last=False, worker_init_fn=None)
    maker = _worker.BatchMaker(spec, 0, 0, seed_globals=False)
    inbox = [Task(7, 0, 0, [0, 1]), PipeOnly("full"), Pause(0.0), SetAttrs({"tag": "x"}), Task(8, 0, 1, [2]), Stop(),
             Task(9, 0, 2, [3])]
    sent = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _worker.serve(maker, lambda: inbox.pop(0), lambda m: sent.append(m) or True)
    assert [type(m) for m in sent] == [Result, Result] and [m.task_id for m in sent] == [7, 8]
    assert sent[1].payload.tolist() == [2] and sent[0].done >= sent[0].started > 0
    assert maker.no_shm and dataset.tag == "x"
    assert inbox == [Task(9, 0, 2, [3])]  # Stop ended the loop
    with pytest.raises(TypeError, match="not a message of nostall.workers._protocol"):
        _worker.serve(maker, lambda: {"tag": "y"}, lambda m: True)
