"""Behaviours torch's own DataLoader tests check, compared between torch and nostall.

Errors raised by user code (wording and type), the warning when an iterable dataset
yields more than the ``len(loader)`` read before ``iter()``, and ``iter(loader)._workers``
(torch's private worker list, which tools and torch's tests read).
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch.utils.data import Dataset

from conftest import impl_nw
from toy_datasets import Raises, SimpleIterable


class RaisesKeep(Dataset):
    """``ds[5]`` raises a ValueError and keeps the exception object it raised."""

    def __init__(self):
        self.raised = []

    def __len__(self):
        return 8

    def __getitem__(self, i):
        if i == 5:
            exc = ValueError("sample 5 is corrupt")
            self.raised.append(exc)
            raise exc
        return i


def _boom(worker_id):
    raise KeyError("no such shard")


def _first_error(loader):
    with pytest.raises(Exception) as info:
        list(loader)
    return info.value


@pytest.mark.parametrize("impl", ["torch", "nostall"])
def test_main_process_error_is_the_original_exception(loaders, impl):
    ds = RaisesKeep()
    err = _first_error(loaders.make(impl, ds, batch_size=2))
    assert err is ds.raised[-1]  # not a copy, not a wrapper: torch raises it as is
    assert str(err) == "sample 5 is corrupt"
    if impl == "nostall" and hasattr(err, "add_note"):
        assert err.__notes__ == ["Raised in the main process while making batch 2 of epoch 0, sample index 5."]


@pytest.mark.parametrize("impl", ["torch", "nostall"])
def test_worker_error_starts_as_torchs(loaders, impl):
    err = _first_error(loaders.make(impl, Raises(8, bad=[5]), batch_size=2, num_workers=2))
    assert type(err) is ValueError
    text = str(err)
    assert re.match(r"Caught ValueError in DataLoader worker process [01]\.\nOriginal Traceback "
                    r"\(most recent call last\):\n", text), text
    assert "ValueError: sample 5 is corrupt" in text
    if impl == "nostall":  # nostall's detail follows the original traceback
        tail = text.rsplit("ValueError: sample 5 is corrupt", 1)[1]
        assert re.fullmatch(r"\nRaised in nostall worker [01] \(pid \d+\) while making batch 2 of epoch 0, "
                            r"sample index 5\.", tail), tail


def test_thread_worker_error_says_thread(loaders):
    err = _first_error(loaders.make("nostall-thread", Raises(8, bad=[5]), batch_size=2, num_workers=2))
    assert type(err) is ValueError
    assert re.match(r"Caught ValueError in DataLoader worker thread [01]\.\nOriginal Traceback", str(err))


@pytest.mark.parametrize("impl", ["torch", "nostall"])
def test_worker_init_fn_error_starts_as_torchs(loaders, impl):
    err = _first_error(loaders.make(impl, Raises(8, bad=[]), batch_size=2, num_workers=1, worker_init_fn=_boom))
    assert type(err) is KeyError
    assert str(err).startswith("Caught KeyError in DataLoader worker process 0.\nOriginal Traceback")
    assert "no such shard" in str(err)


@pytest.mark.parametrize("impl,nw", impl_nw())
def test_iterable_past_len_warns_as_torch(loaders, impl, nw):
    # One worker keeps the stream unduplicated where it matters; 2 workers duplicate it
    # (SimpleIterable is not sharded), which is exactly what the warning is about.
    loader = loaders.make(impl, SimpleIterable(4), batch_size=None, num_workers=nw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        list(iter(loader))  # len() not read yet: no warning whatever comes out
    assert len(loader) == 4
    it = iter(loader)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = list(it)
    past = [w for w in caught if "samples have been fetched" in str(w.message)]
    assert len(past) == len(got) - 4
    if past:
        assert issubclass(past[0].category, UserWarning)
        assert "but 5 samples have been fetched" in str(past[0].message)
        assert ("For multiprocessing data-loading" in str(past[0].message)) == (nw > 0)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("impl", ["torch", "nostall"])
def test_private_workers_list_exits_when_loader_goes(loaders, impl):
    loader = loaders.make(impl, Raises(40, bad=[]), batch_size=2, num_workers=2, persistent_workers=False)
    it = iter(loader)
    next(it)
    workers = it._workers
    assert len(workers) == 2
    assert all(w.is_alive() and w.exitcode is None and w.pid > 0 for w in workers)
    if impl == "nostall":
        assert sorted(w.pid for w in workers) == loader.worker_pids()
    del it
    loaders.close_all()  # torch: shut its iterator down; nostall: close()
    for w in workers:
        w.join(30)
        assert not w.is_alive()
        assert w.exitcode == 0


def test_private_workers_list_empty_without_processes(loaders):
    for kw in ({"num_workers": 0}, {"num_workers": 2, "worker_type": "thread"}):
        it = iter(loaders.make("nostall", Raises(8, bad=[]), batch_size=2, **kw))
        next(it)
        assert it._workers == []
