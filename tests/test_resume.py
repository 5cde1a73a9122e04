"""loader.state_dict() / load_state_dict(): continue exactly where a run stopped."""

from __future__ import annotations

import pickle

import pytest
import torch
from conftest import assert_same_epochs, flat_indices
from toy_datasets import Indexed, RandomValues
from torch.utils.data import IterableDataset

import nostall

pytestmark = pytest.mark.timeout(120)


def _loader(dataset, num_workers, seed=0, **kw):
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return nostall.DataLoader(dataset, batch_size=4, shuffle=True, num_workers=num_workers, generator=gen, **kw)


def _interrupted(dataset, stops, epochs, workers, seed=0, **kw):
    """Run ``epochs`` epochs, saving the state after each number of batches in ``stops``
    (counted within epoch 0) and continuing in a new loader with the next worker count."""
    got, current, state, w = [[]], None, None, 0
    for stop in [*stops, None]:
        current = _loader(dataset, workers[w % len(workers)], seed, **kw)
        w += 1
        if state is not None:
            current.load_state_dict(pickle.loads(pickle.dumps(state)))  # as if saved to disk
        for batch in current:
            got[0].append(batch)
            if stop is not None and len(got[0]) == stop:
                break
        if stop is not None:
            state = current.state_dict()
            current.close()
    for _ in range(epochs - 1):
        got.append(list(current))
    current.close()
    return got


@pytest.mark.parametrize("workers", [(0, 2, 4, 2), (2, 0, 3, 1)])
def test_three_saves_within_an_epoch_give_the_uninterrupted_batches(workers):
    dataset = RandomValues(101)
    with _loader(dataset, 2) as loader:
        expected = [list(loader) for _ in range(3)]
    got = _interrupted(dataset, stops=[3, 11, 20], epochs=3, workers=workers)
    assert_same_epochs(expected, got)


def test_global_rng_order_is_replayed_without_touching_the_callers_stream():
    dataset = Indexed(50)
    torch.manual_seed(7)
    with _loader(dataset, 2, seed=None) as loader:
        expected = [list(loader) for _ in range(2)]
    torch.manual_seed(7)
    first = _loader(dataset, 2, seed=None)
    it = iter(first)
    part = [next(it) for _ in range(5)]
    state = first.state_dict()
    first.close()
    marker = torch.get_rng_state()
    second = _loader(dataset, 0, seed=None)
    second.load_state_dict(state)
    rest = list(second)
    assert torch.equal(torch.get_rng_state(), marker)  # the caller's random stream is untouched
    nxt = list(second)
    second.close()
    assert_same_epochs(expected, [part + rest, nxt])


def test_state_between_epochs_starts_the_next_one():
    dataset = RandomValues(30)
    with _loader(dataset, 2) as loader:
        expected = [list(loader) for _ in range(3)]
    with _loader(dataset, 2) as loader:
        first = list(loader)
        state = loader.state_dict()
    assert state["epoch"] == 1 and state["delivered"] == 0
    with _loader(dataset, 3) as loader:
        loader.load_state_dict(state)
        rest = [list(loader) for _ in range(2)]
    assert_same_epochs(expected, [first, *rest])


def test_out_of_order_delivery_resumes_every_batch_exactly_once():
    dataset = Indexed(80)
    loader = _loader(dataset, 2, in_order=False)
    it = iter(loader)
    part = [next(it) for _ in range(7)]
    state = loader.state_dict()
    loader.close()
    again = _loader(dataset, 2, in_order=False)
    again.load_state_dict(state)
    rest = list(again)
    again.close()
    assert sorted(flat_indices(part + rest)) == list(range(80))


def test_state_is_small_and_checked():
    dataset = Indexed(100_000)
    loader = _loader(dataset, 0)
    it = iter(loader)
    for _ in range(10):
        next(it)
    state = loader.state_dict()
    assert len(pickle.dumps(state)) < 20_000
    assert state["version"] == 2 and state["epoch"] == 0 and state["delivered"] == 10
    with pytest.raises(ValueError, match=r"batch_size: saved 4, this loader 8"):
        nostall.DataLoader(dataset, batch_size=8, shuffle=True).load_state_dict(state)
    with pytest.raises(ValueError, match=r"dataset_len: saved 100000, this loader 99"):
        _loader(Indexed(99), 0).load_state_dict(state)
    with pytest.raises(ValueError, match=r"version 0; this nostall reads version 2"):
        _loader(dataset, 0).load_state_dict(dict(state, version=0))
    with pytest.raises(ValueError, match=r"must be the dict loader.state_dict\(\) returned; got list"):
        _loader(dataset, 0).load_state_dict([])
    with pytest.raises(ValueError, match=r"`state\['streams'\]` holds the positions of an iterable dataset"):
        _loader(dataset, 0).load_state_dict(dict(state, streams={"num_workers": 0}))
    with pytest.raises(ValueError, match=r"`state\['delivered'\]` must be an int >= 0 or a list"):
        _loader(dataset, 0).load_state_dict(dict(state, delivered=-1))
    fresh = _loader(dataset, 0).state_dict()
    assert fresh["fresh"] is True


class Counting(IterableDataset):
    """An iterable dataset that keeps its own position (state_dict / load_state_dict)."""

    def __init__(self, n):
        self.n, self.pos = n, 0

    def __iter__(self):
        while self.pos < self.n:
            self.pos += 1
            yield self.pos - 1
        self.pos = 0

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, state):
        self.pos = state["pos"]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_iterable_dataset_resumes_through_its_own_state(num_workers):
    """Unsharded, every worker yields the whole stream (as torch): each resumes its own."""
    kw = {"batch_size": 3, "num_workers": num_workers}
    with nostall.DataLoader(Counting(20), **kw) as loader:
        expected = [b.tolist() for b in loader]
    loader = nostall.DataLoader(Counting(20), **kw)
    it = iter(loader)
    part = [next(it).tolist() for _ in range(3)]
    state = loader.state_dict()
    loader.close()
    with nostall.DataLoader(Counting(20), **kw) as again:
        again.load_state_dict(state)
        rest = [b.tolist() for b in again]
    assert part + rest == expected
    assert sorted(flat_indices(part + rest)) == sorted(list(range(20)) * max(1, num_workers))
