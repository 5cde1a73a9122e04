"""Contract 2 - same batches as torch.

The reference is always torch's DataLoader with ``num_workers=0`` and the same
arguments; each parametrization runs the loader under test (torch itself included,
so the tests are checked against torch with workers) and compares batch by batch
with exact tensor equality.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from torch.utils.data import BatchSampler, RandomSampler

from conftest import (PROCESS_IMPLS, assert_same_epochs, flat_indices,
                      impl_nw, len_or_error, reference_epochs, run_epochs)
from toy_datasets import (EveryOtherReversed, GrowingBatchSampler, Indexed, Rich, ShardedIterable,
                      SimpleIterable, WithGetitems, WorkerInfoMap, collate_sum, record_worker_init)

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")

N = 23


def check_against_reference(loaders, impl, dataset, epochs=2, seed=None, **kw):
    expected, expected_len = reference_epochs(dataset, epochs=epochs, seed=seed, **kw)
    if seed is not None:
        kw["generator"] = torch.Generator().manual_seed(seed)
    loader = loaders.make(impl, dataset, **kw)
    assert len_or_error(loader) == expected_len, f"len(loader) = {len_or_error(loader)}, torch says {expected_len}"
    got = run_epochs(loader, epochs)
    assert_same_epochs(expected, got)
    return got


# --------------------------------------------------------------------------- map-style basics

BATCHING = {
    "bs1": dict(batch_size=1),
    "bs4": dict(batch_size=4),
    "bs4-drop": dict(batch_size=4, drop_last=True),
    "bs5-keep": dict(batch_size=5, drop_last=False),
    "bs-larger-than-ds": dict(batch_size=64),
    "bs-larger-than-ds-drop": dict(batch_size=64, drop_last=True),
    "no-batching": dict(batch_size=None),
}


@pytest.mark.parametrize("impl,nw", impl_nw())
@pytest.mark.parametrize("batching", list(BATCHING), ids=list(BATCHING))
def test_sequential(impl, nw, batching, loaders):
    check_against_reference(loaders, impl, Indexed(N), num_workers=nw, **BATCHING[batching])


@pytest.mark.parametrize("impl,nw", impl_nw())
@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("seed", [0, 1234])
def test_shuffle_with_generator_every_epoch(impl, nw, drop_last, seed, loaders):
    """Same permutation as torch in every one of 3 epochs (generator drives everything)."""
    got = check_against_reference(loaders, impl, Indexed(N), epochs=3, seed=seed, num_workers=nw,
                                  batch_size=4, shuffle=True, drop_last=drop_last)
    # And the epochs are really shuffled differently (the test would be vacuous otherwise).
    assert flat_indices(got[0]) != flat_indices(got[1])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("impl", PROCESS_IMPLS)
def test_shuffle_with_generator_spawn(impl, loaders):
    check_against_reference(loaders, impl, Indexed(N), epochs=3, seed=7, num_workers=2,
                            multiprocessing_context="spawn", batch_size=4, shuffle=True)


@pytest.mark.parametrize("impl,nw", impl_nw())
def test_shuffle_global_seed_first_epoch(impl, nw, loaders):
    torch.manual_seed(99)
    expected = [b.clone() for b in torch.utils.data.DataLoader(Indexed(N), batch_size=4, shuffle=True)]
    torch.manual_seed(99)
    loader = loaders.make(impl, Indexed(N), batch_size=4, shuffle=True, num_workers=nw)
    got = list(loader)
    assert_same_epochs([expected], [got])


@pytest.mark.parametrize("impl,nw", impl_nw())
@pytest.mark.parametrize("batching", ["bs3", "no-batching"])
def test_custom_sampler(impl, nw, batching, loaders):
    kw = dict(batch_size=3) if batching == "bs3" else dict(batch_size=None)
    check_against_reference(loaders, impl, Indexed(N), sampler=EveryOtherReversed(N), num_workers=nw, **kw)


@pytest.mark.parametrize("impl,nw", impl_nw())
def test_custom_batch_sampler(impl, nw, loaders):
    got = check_against_reference(loaders, impl, Indexed(N), batch_sampler=GrowingBatchSampler(N), num_workers=nw)
    assert [len(b) for b in got[0]][:4] == [1, 2, 3, 4]


@pytest.mark.parametrize("impl,nw", impl_nw())
def test_torch_batch_sampler_over_random_sampler(impl, nw, loaders):
    g = torch.Generator().manual_seed(5)
    bs = BatchSampler(RandomSampler(range(N), generator=g), batch_size=6, drop_last=False)
    g_ref = torch.Generator().manual_seed(5)
    bs_ref = BatchSampler(RandomSampler(range(N), generator=g_ref), batch_size=6, drop_last=False)
    ref = torch.utils.data.DataLoader(Indexed(N), batch_sampler=bs_ref)
    expected = run_epochs(ref, 2)
    loader = loaders.make(impl, Indexed(N), batch_sampler=bs, num_workers=nw)
    assert len(loader) == len(ref)
    assert_same_epochs(expected, run_epochs(loader, 2))


@pytest.mark.parametrize("impl,nw", impl_nw())
@pytest.mark.parametrize("batching", ["bs4", "no-batching"])
def test_getitems_dataset(impl, nw, batching, loaders):
    kw = dict(batch_size=4) if batching == "bs4" else dict(batch_size=None)
    got = check_against_reference(loaders, impl, WithGetitems(N), num_workers=nw, **kw)
    if batching == "bs4":
        assert got[0][0]["via"] == ["getitems"] * 4, "__getitems__ must be used for batches"


@pytest.mark.parametrize("impl,nw", impl_nw())
@pytest.mark.parametrize("batching", ["bs4", "no-batching"])
def test_custom_collate_fn(impl, nw, batching, loaders):
    kw = dict(batch_size=4) if batching == "bs4" else dict(batch_size=None)
    check_against_reference(loaders, impl, Indexed(N), collate_fn=collate_sum, num_workers=nw, **kw)


@pytest.mark.parametrize("impl,nw", impl_nw())
@pytest.mark.parametrize("kind", Rich.KINDS)
def test_default_collate_types(impl, nw, kind, loaders):
    check_against_reference(loaders, impl, Rich(11, kind), epochs=1, num_workers=nw, batch_size=4)


@pytest.mark.parametrize("impl,nw", impl_nw())
@pytest.mark.parametrize("kind", ["numpy", "nested", "dict"])
def test_default_convert_types_without_batching(impl, nw, kind, loaders):
    check_against_reference(loaders, impl, Rich(7, kind), epochs=1, num_workers=nw, batch_size=None)


@pytest.mark.parametrize("impl,nw", impl_nw())
def test_in_order_false_same_batches_any_order(impl, nw, loaders):
    expected, _ = reference_epochs(Indexed(N), epochs=2, batch_size=3)
    loader = loaders.make(impl, Indexed(N), batch_size=3, num_workers=nw, in_order=False)
    for e, got in enumerate(run_epochs(loader, 2)):
        assert sorted(tuple(b.tolist()) for b in got) == sorted(tuple(b.tolist()) for b in expected[e])


@pytest.mark.parametrize("impl,nw", impl_nw())
def test_pin_memory_without_accelerator(impl, nw, loaders):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that no accelerator is present
        check_against_reference(loaders, impl, Rich(9, "dict"), epochs=1, num_workers=nw,
                                batch_size=4, pin_memory=True)


@pytest.mark.parametrize("impl,nw", impl_nw(num_workers=(2,)))
def test_positive_timeout(impl, nw, loaders):
    # (torch only accepts timeout > 0 with workers: its single-process iterator refuses it)
    check_against_reference(loaders, impl, Indexed(N), num_workers=nw, batch_size=4, timeout=30)


@pytest.mark.parametrize("impl", PROCESS_IMPLS)
def test_worker_init_fn_called_once_per_worker(impl, loaders, tmp_path, monkeypatch):
    log = tmp_path / "init.log"
    monkeypatch.setenv("NOSTALL_TEST_INIT_LOG", str(log))
    loader = loaders.make(impl, Indexed(N), batch_size=2, num_workers=2, persistent_workers=True,
                          worker_init_fn=record_worker_init)
    for _ in range(2):
        assert flat_indices(loader) == list(range(N))
    lines = log.read_text().split()
    calls = [(lines[i + 1], lines[i + 2]) for i in range(0, len(lines), 3)]
    assert sorted(w for w, _ in calls) == ["0", "1"], f"worker_init_fn calls (worker_id, pid): {calls}"
    assert all(int(pid) != os.getpid() for _, pid in calls), "worker_init_fn must run in the workers"


# --------------------------------------------------------------------------- worker info


@pytest.mark.parametrize("impl,nw", impl_nw(num_workers=(0, 2, 3)))
def test_get_worker_info_map_style(impl, nw, loaders):
    loader = loaders.make(impl, WorkerInfoMap(12), batch_size=2, num_workers=nw)
    for _ in range(2):
        samples = [s for b in loader for s in _unbatch(b)]
        assert [s["i"] for s in samples] == list(range(12))
        if nw == 0:
            assert all(s["id"] == -1 for s in samples), "get_worker_info() must be None without workers"
            continue
        for s in samples:
            assert 0 <= s["id"] < nw, s
            assert s["num_workers"] == nw, s
            assert isinstance(s["seed"], int), s
            assert s["dataset_ok"], f"worker_info.dataset is not the dataset: {s}"
        # A worker's seed is fixed for the worker (torch: base_seed + id).
        seeds = {}
        for s in samples:
            seeds.setdefault(s["id"], set()).add(s["seed"])
        assert all(len(v) == 1 for v in seeds.values()), f"seeds per worker id: {seeds}"


def _unbatch(batch):
    keys = list(batch)
    n = len(batch[keys[0]])
    return [{k: (batch[k][j].item() if isinstance(batch[k][j], torch.Tensor) else batch[k][j])
             for k in keys} for j in range(n)]


# --------------------------------------------------------------------------- iterable-style


@pytest.mark.filterwarnings("ignore:Length of IterableDataset")
@pytest.mark.parametrize("impl,nw", impl_nw(num_workers=(0, 1, 2)))
@pytest.mark.parametrize("batching", ["bs4", "bs4-drop", "no-batching"])
def test_iterable_without_sharding(impl, nw, batching, loaders):
    """No sharding: every worker yields the whole dataset (torch duplicates it)."""
    kw = {"bs4": dict(batch_size=4), "bs4-drop": dict(batch_size=4, drop_last=True),
          "no-batching": dict(batch_size=None)}[batching]
    ds = SimpleIterable(10)
    loader = loaders.make(impl, ds, num_workers=nw, **kw)
    assert len(loader) == len(torch.utils.data.DataLoader(ds, **kw))
    # Each worker yields the full range as its own batches; batches come round-robin.
    (per_worker,), _ = reference_epochs(ds, epochs=1, **kw)
    expected = [b for group in zip(*([per_worker] * max(nw, 1))) for b in group]
    assert_same_epochs([expected, expected], run_epochs(loader, 2))


@pytest.mark.parametrize("impl,nw", impl_nw(num_workers=(0, 1, 2, 3)))
@pytest.mark.parametrize("uneven", [False, True], ids=["even", "uneven"])
def test_iterable_sharded_round_robin(impl, nw, uneven, loaders):
    _check_sharded(loaders, impl, nw, ShardedIterable(29, uneven=uneven), dict(batch_size=4))


@pytest.mark.parametrize("impl,nw", impl_nw(num_workers=(2, 3)))
@pytest.mark.parametrize("batching", ["bs4-drop", "no-batching"])
def test_iterable_sharded_batching_variants(impl, nw, batching, loaders):
    kw = dict(batch_size=4, drop_last=True) if batching == "bs4-drop" else dict(batch_size=None)
    _check_sharded(loaders, impl, nw, ShardedIterable(29, uneven=True), kw)


def _expected_round_robin(ds, nw, kw):
    """torch's documented order: worker w's batches, taken round-robin, exhausted ones skipped."""
    from torch.utils.data._utils.collate import default_collate, default_convert

    per_worker = []
    for w in range(max(nw, 1)):
        samples = [{"i": i, "worker": w if nw else -1} for i in ds._shard(w, max(nw, 1))]
        bs = kw.get("batch_size")
        if bs is None:
            per_worker.append([default_convert(s) for s in samples])
            continue
        chunks = [samples[j:j + bs] for j in range(0, len(samples), bs)]
        if kw.get("drop_last") and chunks and len(chunks[-1]) < bs:
            chunks.pop()
        per_worker.append([default_collate(c) for c in chunks])
    out = []
    while any(per_worker):
        for w in range(len(per_worker)):
            if per_worker[w]:
                out.append(per_worker[w].pop(0))
    return out


def _check_sharded(loaders, impl, nw, ds, kw):
    expected = _expected_round_robin(ds, nw, kw)
    loader = loaders.make(impl, ds, num_workers=nw, **kw)
    got = run_epochs(loader, 2)
    assert_same_epochs([expected, expected], got)
    # every sample exactly once (minus dropped partial batches)
    idx = sorted(i for b in got[0] for i in (b["i"].tolist() if isinstance(b["i"], torch.Tensor) else [b["i"]]))
    assert len(idx) == len(set(idx))
    if not kw.get("drop_last"):
        assert idx == list(range(ds.n))


@pytest.mark.parametrize("impl,nw", impl_nw(num_workers=(0, 2)))
def test_iterable_len(impl, nw, loaders):
    for kw in (dict(batch_size=3), dict(batch_size=3, drop_last=True), dict(batch_size=None)):
        ds = SimpleIterable(10)
        assert len(loaders.make(impl, ds, num_workers=nw, **kw)) == len(torch.utils.data.DataLoader(ds, **kw))
