"""DataPipes as torch's loader treats them: sharded across workers (each item once)
and reseeded from `generator` or the global RNG at every iter() (torch's own
test_shuffler_iterdatapipe runs the same checks)."""

from __future__ import annotations

import itertools
import pickle

import pytest
import torch
import torch.utils.data.datapipes as dp

from conftest import IMPLS, PROCESS_IMPLS

ITEMS = list(range(60))


def shuffled_pipe():
    return dp.iter.IterableWrapper(ITEMS).shuffle(buffer_size=7).sharding_filter()


def epochs(loader, n=3):
    return [[b.tolist() for b in loader] for _ in range(n)]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("num_workers,persistent,seeded", [
    (nw, pw, gen) for nw, pw, gen in itertools.product((0, 2), (False, True), (False, True)) if nw or not pw])
def test_same_batches_as_torch_and_same_global_draws(loaders, num_workers, persistent, seeded):
    runs = {}
    for impl in PROCESS_IMPLS:
        generator = torch.Generator().manual_seed(5) if seeded else None
        torch.manual_seed(99)
        loader = loaders.make(impl, shuffled_pipe(), batch_size=4, shuffle=True, num_workers=num_workers,
                              persistent_workers=persistent, generator=generator)
        runs[impl] = epochs(loader), torch.rand(1).item()  # the global stream after: same draws
    assert runs["nostall"] == runs["torch"]
    batches = runs["nostall"][0]
    assert all(sorted(sum(epoch, [])) == ITEMS for epoch in batches)  # each item once per epoch
    assert batches[0] != batches[1]  # a new shuffle every epoch


@pytest.mark.timeout(120)
@pytest.mark.parametrize("impl", [i for i in IMPLS if i != "torch"])
def test_manual_seed_before_iter_fixes_the_shuffle(loaders, impl):
    loader = loaders.make(impl, shuffled_pipe(), batch_size=4, shuffle=True, num_workers=2)
    runs = []
    for seed in (123, 123, 321):
        torch.manual_seed(seed)
        runs.append([b.tolist() for b in loader])
    assert runs[0] == runs[1] != runs[2]
    assert sorted(sum(runs[2], [])) == ITEMS


@pytest.mark.timeout(120)
def test_spawned_workers_shard_and_seed_as_torch(loaders):
    runs = {}
    for impl in PROCESS_IMPLS:
        loader = loaders.make(impl, shuffled_pipe(), batch_size=4, shuffle=True, num_workers=2,
                              multiprocessing_context="spawn", generator=torch.Generator().manual_seed(1))
        runs[impl] = epochs(loader, 2)
    assert runs["nostall"] == runs["torch"]


@pytest.mark.timeout(120)
def test_resume_mid_epoch_replays_the_same_shuffle(loaders):
    def make():
        return loaders.make("nostall", shuffled_pipe(), batch_size=4, shuffle=True, num_workers=2,
                            generator=torch.Generator().manual_seed(3))

    whole = epochs(make(), 2)
    first = make()
    it = iter(first)
    head = [next(it).tolist() for _ in range(5)]
    state = pickle.loads(pickle.dumps(first.state_dict()))
    second = make()
    second.load_state_dict(state)
    rest = [b.tolist() for b in second]
    assert head + rest == whole[0]
    assert [b.tolist() for b in second] == whole[1]
