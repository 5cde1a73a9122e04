"""Contracts 3 (epochs), 5 (bounded window) and the persistent pool."""

from __future__ import annotations

import os
import time

import pytest
import torch
from torch.utils.data.distributed import DistributedSampler

from conftest import (IMPLS, PROCESS_IMPLS, assert_same_epochs, flat_indices,
                      impl_nw, nostall_module, reference_epochs)
from toy_datasets import EpochAware, Indexed, Pid, Scaled, StartLog, append_line

N = 30


@pytest.mark.parametrize("impl,nw", impl_nw())
@pytest.mark.parametrize("shuffle", [False, True])
def test_many_epochs_complete(impl, nw, shuffle, loaders):
    E = 5
    kw = dict(batch_size=4, shuffle=shuffle)
    expected, _ = reference_epochs(Indexed(N), epochs=E, seed=11, **kw)
    loader = loaders.make(impl, Indexed(N), num_workers=nw,
                          generator=torch.Generator().manual_seed(11), **kw)
    got = []
    for epoch in range(E):
        batches = []
        for batch in loader:
            batches.append(batch)
        got.append(batches)
    assert_same_epochs(expected, got)
    for e in range(E):
        assert sorted(flat_indices(got[e])) == list(range(N)), f"epoch {e} incomplete"


def _dist_expected(n, epoch):
    s = DistributedSampler(range(n), num_replicas=2, rank=0, shuffle=True, seed=3)
    s.set_epoch(epoch)
    return list(s)


@pytest.mark.parametrize("impl,nw", impl_nw())
@pytest.mark.parametrize("epochs", [[0, 1, 2], [0, 7, 3]], ids=["sequential", "unexpected"])
def test_distributed_sampler_set_epoch(impl, nw, epochs, loaders):
    """Each epoch yields exactly the sampler's indices for the epoch set before iter().

    The "unexpected" case jumps 0 -> 7 -> 3: anything a loader prepared ahead for
    epoch 1 or 8 must be thrown away.
    """
    ds = Indexed(N)
    sampler = DistributedSampler(ds, num_replicas=2, rank=0, shuffle=True, seed=3)
    loader = loaders.make(impl, ds, sampler=sampler, batch_size=4, num_workers=nw)
    assert len(loader) == 4  # 15 indices per rank, batches of 4
    for e in epochs:
        sampler.set_epoch(e)
        got = flat_indices(loader)
        assert got == _dist_expected(N, e), f"epoch {e}: got {got}, sampler says {_dist_expected(N, e)}"
    assert _dist_expected(N, 0) != _dist_expected(N, 7)


@pytest.mark.parametrize("impl,nw", impl_nw())
def test_distributed_sampler_without_set_epoch_repeats(impl, nw, loaders):
    ds = Indexed(N)
    sampler = DistributedSampler(ds, num_replicas=2, rank=0, shuffle=True, seed=3)
    loader = loaders.make(impl, ds, sampler=sampler, batch_size=4, num_workers=nw)
    for e in range(3):
        assert flat_indices(loader) == _dist_expected(N, 0), f"epoch {e}"


@pytest.mark.parametrize("impl,nw", impl_nw(num_workers=(0, 2)))
def test_dataset_set_epoch_reaches_workers(impl, nw, loaders):
    """``dataset.set_epoch(e)`` before iter() shows in that epoch's samples.

    torch gets this right only when workers are recreated each epoch (its default);
    with ``persistent_workers=True`` torch's workers keep a stale copy, which is why
    torch is run with its defaults here and nostall (persistent by default) must
    still see the new epoch.
    """
    ds = EpochAware(12)
    loader = loaders.make(impl, ds, batch_size=5, num_workers=nw)
    for e in (0, 1, 2, 5):
        ds.set_epoch(e)
        got = flat_indices(loader)
        assert got == [i + 1000 * e for i in range(12)], f"after set_epoch({e}) got {got}"


def _epochs_changing(loader, ds, attr: str, values) -> list:
    """Each epoch's samples, after setting ``ds.<attr>`` (or calling set_epoch) to the next value."""
    out = []
    for value in values:
        if attr == "set_epoch":
            ds.set_epoch(value)
        else:
            setattr(ds, attr, value)
        out.append(flat_indices(loader))
    return out


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_plain_dataset_attributes_stay_as_at_first_iter_like_torchs_persistent_workers(method, loaders):
    """A dataset without set_epoch: an attribute reassigned in the main process does not
    reach persistent workers, in torch (its own tests assert it) and in nostall."""
    got = {}
    for impl in PROCESS_IMPLS:
        ds = Scaled(8)
        loader = loaders.make(impl, ds, batch_size=3, num_workers=2, persistent_workers=True,
                              multiprocessing_context=method)
        got[impl] = _epochs_changing(loader, ds, "scale", [1, 10, 100])
    assert got["nostall"] == got["torch"] == [list(range(8))] * 3


def test_sync_dataset_attributes_true_behaves_like_fresh_workers(loaders):
    """The opt-in: every reassigned attribute reaches the workers, as torch's transient
    workers (re-created with the dataset of the moment at each iter()) see it."""
    ds_t, ds_n = Scaled(8), Scaled(8)
    torch_loader = loaders.make("torch", ds_t, batch_size=3, num_workers=2, persistent_workers=False)
    loader = loaders.make("nostall", ds_n, batch_size=3, num_workers=2, sync_dataset_attributes=True)
    assert loader.sync_dataset_attributes is True  # an attribute, for frameworks that rebuild loaders
    expected = _epochs_changing(torch_loader, ds_t, "scale", [1, 10, 100])
    assert _epochs_changing(loader, ds_n, "scale", [1, 10, 100]) == expected
    assert expected[2] == [i * 100 for i in range(8)]
    assert len(set(loader.worker_pids())) == 2  # the same workers all along


def test_sync_dataset_attributes_false_leaves_even_set_epoch_to_the_dataset(loaders):
    """The opt-out for a dataset with set_epoch: as torch's persistent workers, the
    workers keep the epoch they started with."""
    got = {}
    for impl, extra in (("torch", {}), ("nostall", {"sync_dataset_attributes": False})):
        ds = EpochAware(6)
        loader = loaders.make(impl, ds, batch_size=4, num_workers=2, persistent_workers=True, **extra)
        got[impl] = _epochs_changing(loader, ds, "set_epoch", [0, 1, 2])
    assert got["nostall"] == got["torch"] == [list(range(6))] * 3


def test_sync_dataset_attributes_must_be_bool_or_none():
    nostall = nostall_module()
    with pytest.raises(ValueError, match=r"`sync_dataset_attributes` must be None .* got 'yes'"):
        nostall.DataLoader(Indexed(4), sync_dataset_attributes="yes")


@pytest.mark.parametrize("impl,nw", impl_nw())
@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("stop_after", [1, 3])
def test_break_early_then_next_epoch(impl, nw, shuffle, stop_after, loaders):
    """Abandoning an epoch leaves nothing behind: the next epoch is complete and exact."""
    kw = dict(batch_size=3, shuffle=shuffle)

    def pattern(loader):
        first = []
        for i, b in enumerate(loader):
            first.append(b)
            if i + 1 == stop_after:
                break
        return [first, list(loader), list(loader)]

    ref = torch.utils.data.DataLoader(Indexed(N), generator=torch.Generator().manual_seed(2), **kw)
    expected = pattern(ref)
    loader = loaders.make(impl, Indexed(N), num_workers=nw, generator=torch.Generator().manual_seed(2), **kw)
    got = pattern(loader)
    assert_same_epochs(expected, got)
    for e in (1, 2):
        assert sorted(flat_indices(got[e])) == list(range(N)), f"epoch after the break #{e}"


@pytest.mark.parametrize("impl,nw", impl_nw())
def test_exception_in_loop_body_then_next_epoch(impl, nw, loaders):
    loader = loaders.make(impl, Indexed(N), batch_size=4, num_workers=nw)
    with pytest.raises(KeyError):
        for i, _ in enumerate(loader):
            if i == 2:
                raise KeyError("user code failed")
    assert flat_indices(loader) == list(range(N))


@pytest.mark.parametrize("impl,nw", impl_nw())
def test_two_iterators_second_restarts_epoch(impl, nw, loaders):
    """iter() twice: the second iterator gives a full epoch (torch semantics)."""
    loader = loaders.make(impl, Indexed(N), batch_size=4, num_workers=nw)
    it = iter(loader)
    next(it)
    assert flat_indices(iter(loader)) == list(range(N))


# --------------------------------------------------------------------------- persistent pool


def _pids_per_epoch(loader, epochs=3):
    return [{pid for b in loader for pid in b[1].tolist()} for _ in range(epochs)]


@pytest.mark.parametrize("impl", PROCESS_IMPLS)
def test_persistent_workers_same_pids(impl, loaders):
    kw = dict(persistent_workers=True) if impl == "torch" else {}  # nostall: the default
    loader = loaders.make(impl, Pid(24), batch_size=2, num_workers=2, **kw)
    per_epoch = _pids_per_epoch(loader)
    every = set().union(*per_epoch)
    assert os.getpid() not in every, "samples must come from worker processes"
    assert len(every) <= 2, f"more than num_workers=2 distinct worker pids over 3 epochs: {per_epoch}"


@pytest.mark.parametrize("impl", PROCESS_IMPLS)
def test_transient_workers_new_pids_each_epoch(impl, loaders):
    kw = dict(persistent_workers=False)
    loader = loaders.make(impl, Pid(24), batch_size=2, num_workers=2, **kw)
    per_epoch = _pids_per_epoch(loader)
    assert os.getpid() not in set().union(*per_epoch)
    for e in (1, 2):
        assert not (per_epoch[e] & per_epoch[e - 1]), (
            f"persistent_workers=False must use new workers each epoch: {per_epoch}")


# --------------------------------------------------------------------------- bounded window


W, P, B, N_BATCHES = 2, 2, 3, 16


def _consume_logged(loader, log, epochs, deadline_s, stop_waiting_after_stall):
    """Iterate, logging "C" per batch; after each batch wait (up to ``deadline_s``)
    until the next batch of the epoch has been started by a worker.

    Returns (max batches in flight, list of (epoch, batch) after which nothing started).
    """
    worst, stalls = 0, []
    for epoch in range(epochs):
        for k, _batch in enumerate(loader):
            append_line(log, "C")
            consumed = epoch * N_BATCHES + k + 1
            want = min((epoch + 1) * N_BATCHES, consumed + 1)
            if not (stalls and stop_waiting_after_stall):
                deadline = time.monotonic() + deadline_s
                while _count_started(log) < want and time.monotonic() < deadline:
                    time.sleep(0.002)
                if _count_started(log) < want:
                    stalls.append((epoch, k))
            worst = max(worst, _max_in_flight(log))
    return worst, stalls


def _logged_loader(loaders, impl, tmp_path):
    log = str(tmp_path / "window.log")
    open(log, "w").close()
    ds = StartLog(N_BATCHES * B, log)
    return loaders.make(impl, ds, batch_size=B, num_workers=W, prefetch_factor=P), log


@pytest.mark.parametrize("impl", IMPLS)
def test_bounded_in_flight_window(impl, loaders, tmp_path):
    """With num_workers=2, prefetch_factor=2, batches started but not yet returned by
    next() never exceed 2*2, +1 for the batch being handed over (torch dispatches the
    next index before returning a batch; counted here because the consumer can only
    record consumption after next() returns).

    After each batch the consumer idles until the loader has started the next batch
    (an event, 1 s deadline), so the workers run ahead while the consumer is idle and
    an unbounded prefetcher overruns the bound.
    """
    loader, log = _logged_loader(loaders, impl, tmp_path)
    worst, _ = _consume_logged(loader, log, epochs=2, deadline_s=1.0, stop_waiting_after_stall=True)
    assert worst <= W * P + 1, f"in flight reached {worst} > {W * P + 1}"
    assert worst >= 2, "no prefetching observed at all; the measurement is broken"


@pytest.mark.parametrize("impl", IMPLS)
def test_prefetches_while_consumer_is_idle(impl, loaders, tmp_path):
    """While the consumer holds a batch and does its own work, the loader keeps
    working: the next batch gets started without another call to next()."""
    loader, log = _logged_loader(loaders, impl, tmp_path)
    _, stalls = _consume_logged(loader, log, epochs=2, deadline_s=5.0, stop_waiting_after_stall=True)
    assert not stalls, (
        f"after batch (epoch, index) {stalls[0]} was returned, no further batch was started "
        f"within 5 s although the window (num_workers={W} * prefetch_factor={P}) had room")


def _count_started(path):
    with open(path) as f:
        return sum(1 for line in f if line.startswith("S"))


def _max_in_flight(path):
    started = consumed = worst = 0
    with open(path) as f:
        for line in f:
            if line.startswith("S"):
                started += 1
                worst = max(worst, started - consumed)
            elif line.startswith("C"):
                consumed += 1
    return worst
