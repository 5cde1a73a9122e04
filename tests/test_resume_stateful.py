"""Resume through the user's own state: iterable datasets with workers (each worker's
stream), and samplers / datasets that implement ``state_dict`` / ``load_state_dict``.

Every run here uses real worker processes (or threads); a saved state is pickled and
loaded into a new loader, as after a restart. References: the uninterrupted nostall
run and torch's DataLoader with the same arguments.
"""

from __future__ import annotations

import pickle
import random
import time

import pytest
import torch
from conftest import assert_same_epochs
from toy_datasets import Indexed, RandomValues, ShardedIterable
from torch.utils.data import Dataset, IterableDataset, Sampler, get_worker_info

import nostall

pytestmark = [pytest.mark.timeout(120), pytest.mark.filterwarnings("ignore:This DataLoader will create")]


# --------------------------------------------------------------------------- iterable datasets


class ShardWithPosition(IterableDataset):
    """Shards 0..n-1 over workers (``get_worker_info``) and keeps its position in its
    shard (``state_dict``). ``uneven``: worker w gets a block growing with w, so low
    workers run out first. Like many datasets, it resets its position at the end."""

    def __init__(self, n: int, uneven: bool = False):
        self.n, self.uneven, self.pos = n, uneven, 0

    def _shard(self) -> list:
        info = get_worker_info()
        w, nw = (0, 1) if info is None else (info.id, info.num_workers)
        if not self.uneven:
            return list(range(w, self.n, nw))
        total = nw * (nw + 1) // 2
        return list(range(self.n * (w * (w + 1) // 2) // total, self.n * ((w + 1) * (w + 2) // 2) // total))

    def __iter__(self):
        shard = self._shard()
        while self.pos < len(shard):
            self.pos += 1
            yield shard[self.pos - 1]
        self.pos = 0

    def state_dict(self) -> dict:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.pos = state["pos"]


def _values(batch):
    """A batch as plain values (tensors, or ShardedIterable's dicts of tensors)."""
    if isinstance(batch, dict):
        return {k: v.tolist() for k, v in batch.items()}
    return batch.tolist()


def _epochs(loader, epochs):
    return [[_values(b) for b in loader] for _ in range(epochs)]


def _resumed(make, stops, epochs=2):
    """Epoch 0 taken in pieces: after each count in ``stops`` (cumulative) the state is
    saved, pickled and loaded into a new loader from ``make(i)``; then ``epochs - 1``
    more epochs. Returns the epochs and the states saved."""
    got, states, state = [[]], [], None
    for i, stop in enumerate([*stops, None]):
        loader = make(i)
        if state is not None:
            loader.load_state_dict(pickle.loads(pickle.dumps(state)))
        for batch in loader:
            got[0].append(_values(batch))
            if stop is not None and len(got[0]) == stop:
                break
        if stop is None:
            got += _epochs(loader, epochs - 1)
        else:
            state = loader.state_dict()
            states.append(state)
        loader.close()
    return got, states


@pytest.mark.parametrize("uneven", [False, True], ids=["even", "uneven"])
@pytest.mark.parametrize("num_workers", [2, 3])
def test_iterable_dataset_with_workers_resumes_each_workers_stream(num_workers, uneven):
    n, kw = 61, {"batch_size": 3, "num_workers": num_workers}
    reference = [_values(b) for b in torch.utils.data.DataLoader(ShardWithPosition(n, uneven), **kw)]
    with nostall.DataLoader(ShardWithPosition(n, uneven), **kw) as loader:
        expected = _epochs(loader, 2)
    assert expected[0] == reference  # torch's round-robin over the workers
    stops = [1, 4, 9, 13, 16, len(expected[0]) - 1]
    got, states = _resumed(lambda i: nostall.DataLoader(ShardWithPosition(n, uneven), **kw), stops)
    assert got == expected
    assert all(s["streams"]["num_workers"] == num_workers for s in states)
    assert all(w[0] is not None for s in states[2:] for w in s["streams"]["workers"])  # positions, not counts
    if uneven:  # a save was taken after worker 0's stream had ended
        assert any(0 in s["streams"]["exhausted"] for s in states)


@pytest.mark.parametrize("impl", ["nw0", "nw2", "thread2"])
def test_iterable_dataset_without_state_replays_each_workers_batches(impl):
    """No state_dict: each worker's stream restarts and drops the batches it had delivered."""
    kw = {"batch_size": 4, "num_workers": 0 if impl == "nw0" else 2,
          "worker_type": "thread" if impl.startswith("thread") else "process"}
    for uneven in (False, True):
        reference = [_values(b) for b in torch.utils.data.DataLoader(
            ShardedIterable(70, uneven), batch_size=4, num_workers=kw["num_workers"])]
        with nostall.DataLoader(ShardedIterable(70, uneven), **kw) as loader:
            expected = _epochs(loader, 2)
        assert expected[0] == reference
        got, states = _resumed(lambda i, u=uneven: nostall.DataLoader(ShardedIterable(70, u), **kw), [2, 7, 12])
        assert got == expected
        assert all(w[0] is None for s in states for w in s["streams"]["workers"])  # replayed by count


def test_iterable_dataset_in_process_resumes_through_its_state():
    """num_workers=0, including saves just before and just after the short last batch."""
    kw = {"batch_size": 4}
    with nostall.DataLoader(ShardWithPosition(30), **kw) as loader:
        expected = _epochs(loader, 2)
    for stops in ([2, 5], [len(expected[0]) - 1], [len(expected[0])]):
        got, _ = _resumed(lambda i: nostall.DataLoader(ShardWithPosition(30), **kw), stops)
        assert got == expected


def test_iterable_dataset_out_of_order_resumes_every_sample_once():
    kw = {"batch_size": 3, "num_workers": 2, "in_order": False}
    got, _ = _resumed(lambda i: nostall.DataLoader(ShardWithPosition(40, uneven=True), **kw), [3, 8], epochs=2)
    for epoch in got:
        assert sorted(v for batch in epoch for v in batch) == list(range(40))


def test_iterable_dataset_needs_the_saved_number_of_workers():
    loader = nostall.DataLoader(ShardWithPosition(40), batch_size=3, num_workers=2)
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    loader.close()
    for workers in (3, 0):
        other = nostall.DataLoader(ShardWithPosition(40), batch_size=3, num_workers=workers)
        with pytest.raises(ValueError, match=rf"num_workers=2; this one has num_workers={workers}.*"
                                             r"build the loader with num_workers=2"):
            other.load_state_dict(state)


# --------------------------------------------------------------------------- samplers


class _RngState:
    """The mutable part of OwnRngSampler, in one object (nostall compares plain
    attributes of samplers between epochs; this one's identity stays the same)."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.start = self.rng.getstate()  # the generator's state when this epoch shuffled
        self.pos = 0  # indices yielded in this epoch
        self.resume = None

    def begin(self) -> int:
        """Start an epoch: from a loaded state (returns the items to skip) or from here."""
        skip = 0
        if self.resume is not None:
            self.rng.setstate(self.resume["start"])
            skip, self.resume = self.resume["pos"], None
        self.start = self.rng.getstate()
        return skip


class OwnRngSampler(Sampler):
    """Shuffles with its own ``random.Random``, which advances from epoch to epoch:
    nothing nostall replays (torch generators, set_epoch) knows where it is."""

    def __init__(self, n: int, seed: int = 0):
        self.n = n
        self._s = _RngState(seed)

    def __iter__(self):
        s = self._s
        skip = s.begin()
        order = list(range(self.n))
        s.rng.shuffle(order)
        for i in range(skip, self.n):
            s.pos = i + 1
            yield order[i]

    def __len__(self):
        return self.n

    def state_dict(self) -> dict:
        return {"start": self._s.start, "pos": self._s.pos}

    def load_state_dict(self, state: dict) -> None:
        self._s.resume = dict(state)


class OwnRngBatchSampler(Sampler):
    """Batches of 1 to 5 indices, sizes and order from its own ``random.Random``."""

    def __init__(self, n: int, seed: int = 0):
        self.n = n
        self._s = _RngState(seed)

    def _batches(self):
        s = self._s
        order = list(range(self.n))
        s.rng.shuffle(order)
        out = []
        while order:
            size = s.rng.randint(1, 5)
            out.append(order[:size])
            order = order[size:]
        return out

    def __iter__(self):
        s = self._s
        skip = s.begin()
        batches = self._batches()
        for i in range(skip, len(batches)):
            s.pos = i + 1
            yield batches[i]

    state_dict = OwnRngSampler.state_dict
    load_state_dict = OwnRngSampler.load_state_dict


def _sampler_epochs(make_loader, epochs, between=None):
    """Run ``epochs`` epochs of ``make_loader()``; ``between(epoch)`` is called before each."""
    out = []
    loader = make_loader()
    for epoch in range(epochs):
        if between is not None:
            between(loader, epoch)
        out.append(list(loader))
    if hasattr(loader, "close"):
        loader.close()
    return out


def _resume_in_epoch(make_loader, epoch, stop, epochs, between=None, workers_after=None):
    """Run until ``stop`` batches of ``epoch`` are delivered, save, and continue in a new
    loader (``workers_after`` workers) until ``epochs`` epochs are done."""
    first = make_loader()
    got = []
    for e in range(epoch + 1):
        if between is not None:
            between(first, e)
        got.append([])
        for batch in first:
            got[-1].append(batch)
            if e == epoch and len(got[-1]) == stop:
                break
    state = pickle.loads(pickle.dumps(first.state_dict()))
    first.close()
    second = make_loader(workers_after)
    second.load_state_dict(state)
    for e in range(epoch, epochs):
        if between is not None:
            between(second, e)
        part = list(second)
        if e == epoch:
            got[-1] += part
        else:
            got.append(part)
    second.close()
    return got, state


@pytest.mark.parametrize("workers", [(2, 0), (2, 3), (0, 2)])
def test_sampler_with_its_own_random_state_resumes_through_state_dict(workers):
    dataset = RandomValues(53)  # per-batch random values: batch numbers must be kept too

    def make(nw=None):
        return nostall.DataLoader(dataset, batch_size=4, sampler=OwnRngSampler(53, 11),
                                  num_workers=workers[0] if nw is None else nw,
                                  generator=torch.Generator().manual_seed(1))

    expected = _sampler_epochs(make, 3)
    torch_indices = _sampler_epochs(lambda: torch.utils.data.DataLoader(
        Indexed(53), batch_size=4, sampler=OwnRngSampler(53, 11)), 3)
    assert [[b["i"].tolist() for b in e] for e in expected] == [[b.tolist() for b in e] for e in torch_indices]
    got, state = _resume_in_epoch(make, epoch=1, stop=5, epochs=3, workers_after=workers[1])
    assert state["sampler"]["role"] == "sampler" and state["sampler"]["upto"] == 5
    assert_same_epochs(expected, got)


def test_sampler_with_its_own_random_state_resumes_between_epochs():
    """Saved after an epoch ended: the sampler is taken to that end, then goes on."""
    def make(nw=2):
        return nostall.DataLoader(Indexed(30), batch_size=4, sampler=OwnRngSampler(30, 5), num_workers=nw)

    expected = _sampler_epochs(make, 3)
    with make() as loader:
        first = list(loader)
        state = pickle.loads(pickle.dumps(loader.state_dict()))
    assert state["epoch"] == 1 and state["delivered"] == 0 and state["sampler"]["ended"]
    with make(0) as loader:
        loader.load_state_dict(state)
        rest = [list(loader) for _ in range(2)]
    assert_same_epochs(expected, [first, *rest])


def test_batch_sampler_with_its_own_random_state_resumes_through_state_dict():
    def make(nw=2):
        return nostall.DataLoader(RandomValues(60), batch_sampler=OwnRngBatchSampler(60, 3), num_workers=nw,
                                  generator=torch.Generator().manual_seed(2))

    expected = _sampler_epochs(make, 3)
    torch_indices = _sampler_epochs(lambda: torch.utils.data.DataLoader(
        Indexed(60), batch_sampler=OwnRngBatchSampler(60, 3)), 3)
    assert [[b["i"].tolist() for b in e] for e in expected] == [[b.tolist() for b in e] for e in torch_indices]
    got, state = _resume_in_epoch(make, epoch=1, stop=6, epochs=3, workers_after=3)
    assert state["sampler"]["role"] == "batch_sampler"
    assert_same_epochs(expected, got)


def test_torchdata_stateful_distributed_sampler():
    sampler_mod = pytest.importorskip("torchdata.stateful_dataloader.sampler")
    dataset = Indexed(45)

    def make(nw=2):
        sampler = sampler_mod.StatefulDistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=3)
        return nostall.DataLoader(dataset, batch_size=4, sampler=sampler, num_workers=nw)

    def set_epoch(loader, epoch):
        loader.sampler.set_epoch(epoch)

    expected = _sampler_epochs(make, 3, set_epoch)

    def make_torch():
        sampler = sampler_mod.StatefulDistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=3)
        return torch.utils.data.DataLoader(dataset, batch_size=4, sampler=sampler)

    assert_same_epochs(_sampler_epochs(make_torch, 3, set_epoch), expected)
    got, state = _resume_in_epoch(make, epoch=1, stop=4, epochs=3, between=set_epoch, workers_after=0)
    assert state["sampler"]["state"] == {"yielded": 16}  # recorded when batch 3 was drawn, not the live one
    assert_same_epochs(expected, got)


class SlowMultiplesOf7(Indexed):
    """Samples 0, 7, 14, ... take 20 ms: batches arrive out of order."""

    def __getitem__(self, i):
        if i % 7 == 0:
            time.sleep(0.02)
        return super().__getitem__(i)


def test_out_of_order_delivery_with_a_stateful_sampler():
    def make(nw=2):
        return nostall.DataLoader(SlowMultiplesOf7(80), batch_size=2, sampler=OwnRngSampler(80, 9), num_workers=nw,
                                  in_order=False)

    def as_sets(epochs):
        return [sorted(tuple(b.tolist()) for b in e) for e in epochs]

    expected = _sampler_epochs(make, 3)
    got, state = _resume_in_epoch(make, epoch=1, stop=12, epochs=3, workers_after=3)
    assert as_sets(got) == as_sets(expected)
    for epoch in got:
        assert sorted(i for b in epoch for i in b.tolist()) == list(range(80))  # each sample once
    upto = state["sampler"]["upto"]
    assert set(range(upto)) <= set(state["delivered"]) and upto <= len(state["delivered"]) == 12


class Offset(Dataset):
    """A map-style dataset with its own state: an offset added to every sample."""

    def __init__(self, n: int):
        self.n, self.offset = n, 0

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i + self.offset

    def state_dict(self) -> dict:
        return {"offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        self.offset = state["offset"]


def test_map_style_dataset_state_is_saved_and_reaches_the_workers():
    def make(dataset, nw):
        return nostall.DataLoader(dataset, batch_size=5, shuffle=True, num_workers=nw,
                                  generator=torch.Generator().manual_seed(4))

    dataset = Offset(40)
    with make(dataset, 2) as loader:
        expected = [list(loader)]
        dataset.offset = 1000  # between epochs, as set_epoch would (workers see it by attribute sync)
        expected.append(list(loader))
    dataset = Offset(40)
    with make(dataset, 2) as loader:
        first = list(loader)
        dataset.offset = 1000
        it = iter(loader)
        part = [next(it) for _ in range(3)]
        state = pickle.loads(pickle.dumps(loader.state_dict()))
    assert state["states"] == {"dataset": {"offset": 1000}}
    with make(Offset(40), 3) as loader:  # offset 0 until the state is loaded
        loader.load_state_dict(state)
        rest = list(loader)
    assert_same_epochs(expected, [first, part + rest])
    assert all(v >= 1000 for b in rest for v in b.tolist())


def _same_state(a, b) -> bool:
    """Equality of two states (which hold tensors: generator states)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same_state, a, b))
    return a == b


def _chain_of_resumes(make, workers, takes):
    """One epoch taken in pieces: ``takes[i]`` batches from a loader with ``workers[i]``
    workers; before taking, each resumed loader saves twice (just after loading, and
    just after ``iter()``) and the second save is the one carried on. ``None``: the rest."""
    got, state = [], None
    for nw, take in zip(workers, takes):
        loader = make(nw)
        if state is not None:
            loader.load_state_dict(pickle.loads(pickle.dumps(state)))
            assert _same_state(loader.state_dict(), state)  # loaded, not yet iterated
            it = iter(loader)
            again = loader.state_dict()  # started, nothing delivered yet
            loader.close()
            loader = make(nw)
            loader.load_state_dict(pickle.loads(pickle.dumps(again)))
        it = iter(loader)
        for _ in range(take) if take is not None else iter(int, 1):
            try:
                got.append(_values(next(it)))
            except StopIteration:
                break
        state = loader.state_dict()
        loader.close()
    return got


@pytest.mark.parametrize("in_order", [True, False])
def test_saving_again_right_after_a_resume_keeps_the_position(in_order):
    def sampled(nw):
        return nostall.DataLoader(SlowMultiplesOf7(60), batch_size=3, sampler=OwnRngSampler(60, 2), num_workers=nw,
                                  in_order=in_order)

    got = _chain_of_resumes(sampled, [2, 3, 0, 2], [7, 4, 3, None])
    with sampled(2) as loader:
        expected = [_values(b) for b in loader]
    assert (got if in_order else sorted(got)) == (expected if in_order else sorted(expected))

    def streams(nw):
        return nostall.DataLoader(ShardWithPosition(50, uneven=True), batch_size=3, num_workers=nw, in_order=in_order)

    got = _chain_of_resumes(streams, [2, 2, 2], [5, 6, None])
    with streams(2) as loader:
        expected = [_values(b) for b in loader]
    if in_order:
        assert got == expected
    assert sorted(v for b in got for v in b) == list(range(50))


class StateNeedsArguments(ShardWithPosition):
    """A state_dict that needs arguments, as litdata's and MosaicML streaming's do."""

    def state_dict(self, num_samples_yielded: int, num_workers: int, batch_size: int) -> dict:
        raise AssertionError("nostall called a state_dict that needs arguments")


@pytest.mark.parametrize("impl", ["nw0", "nw2", "thread2"])
def test_state_dict_needing_arguments_is_never_called(impl):
    """Such a dataset loads as torch's DataLoader loads it, and resumes by replay."""
    kw = {"batch_size": 3, "num_workers": 0 if impl == "nw0" else 2,
          "worker_type": "thread" if impl == "thread2" else "process"}
    reference = [_values(b) for b in torch.utils.data.DataLoader(StateNeedsArguments(40), batch_size=3,
                                                                 num_workers=kw["num_workers"])]
    with nostall.DataLoader(StateNeedsArguments(40), **kw) as loader:
        expected = _epochs(loader, 2)
    assert expected[0] == reference
    got, states = _resumed(lambda i: nostall.DataLoader(StateNeedsArguments(40), **kw), [2, 6])
    assert got == expected
    assert all(w[0] is None for s in states for w in s["streams"]["workers"])  # replayed by count


def test_thread_workers_resume_each_workers_stream_through_its_own_copy():
    """Thread workers of an iterable dataset hold their own copies: their positions are saved."""
    kw = {"batch_size": 3, "num_workers": 2, "worker_type": "thread"}
    reference = [_values(b) for b in torch.utils.data.DataLoader(ShardWithPosition(41), batch_size=3, num_workers=2)]
    with nostall.DataLoader(ShardWithPosition(41), **kw) as loader:
        expected = _epochs(loader, 2)
    assert expected[0] == reference
    got, states = _resumed(lambda i: nostall.DataLoader(ShardWithPosition(41), **kw), [3, 8])
    assert got == expected
    assert all(w[0] is not None for s in states for w in s["streams"]["workers"])  # positions, not counts
