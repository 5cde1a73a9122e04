"""Contract 3 - determinism of randomness inside workers.

A sample draws from Python's ``random``, numpy's and torch's global RNGs. nostall
seeds them per batch from (seed, epoch, batch_no), so a batch's content does not
depend on how many process workers there are, nor on which worker made it. torch
does not promise that (its seeds are per worker), so that part is nostall-only;
what torch does promise - the same run twice with the same generator gives the same
values, and epochs differ - is checked for both.

Thread workers share the interpreter's global RNGs (and with the training loop), so
nostall does not reseed them in threads; what it promises instead is
``nostall.worker_rng()``: generators seeded per batch exactly like the globals are
in process workers. A dataset drawing from those gives the same batches for thread
workers, process workers and no workers.
"""

from __future__ import annotations

import pytest
import torch

from conftest import PROCESS_IMPLS, assert_same_epochs, run_epochs
from toy_datasets import RandomValues, WorkerRngValues

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")

N, BS, EPOCHS = 20, 3, 2


def _run(loaders, impl, nw, seed=5, dataset=RandomValues, **kw):
    loader = loaders.make(impl, dataset(N), batch_size=BS, shuffle=True, num_workers=nw,
                          generator=torch.Generator().manual_seed(seed), **kw)
    return run_epochs(loader, EPOCHS)


def test_same_values_for_any_number_of_process_workers(loaders):
    reference = _run(loaders, "nostall", 0)
    for nw in (1, 2, 4):
        try:
            assert_same_epochs(reference, _run(loaders, "nostall", nw))
        except AssertionError as exc:
            raise AssertionError(f"num_workers={nw} differs from num_workers=0: {exc}") from None


@pytest.mark.parametrize("impl", PROCESS_IMPLS)
def test_same_values_across_runs(impl, loaders):
    assert_same_epochs(_run(loaders, impl, 2, seed=8), _run(loaders, impl, 2, seed=8))


@pytest.mark.parametrize("impl", PROCESS_IMPLS)
def test_different_seed_different_values(impl, loaders):
    a, b = _run(loaders, impl, 2, seed=1), _run(loaders, impl, 2, seed=2)
    assert not torch.equal(a[0][0]["torch"], b[0][0]["torch"])


@pytest.mark.parametrize("impl", PROCESS_IMPLS)
def test_values_differ_between_epochs_and_samples(impl, loaders):
    """Per-batch seeding must not repeat: each epoch and each sample get fresh draws."""
    epochs = _run(loaders, impl, 2)
    for key in ("py", "np", "torch"):
        per_epoch = []
        for batches in epochs:
            values = {}
            for b in batches:
                for i, v in zip(b["i"].tolist(), b[key].flatten().tolist()):
                    values[i] = v
            per_epoch.append(values)
            assert len(set(values.values())) == N, f"{key}: repeated values within an epoch"
        same = [i for i in range(N) if per_epoch[0][i] == per_epoch[1][i]]
        assert not same, f"{key}: samples {same} drew the same value in epochs 0 and 1"


def test_worker_rng_same_for_threads_processes_and_no_workers(loaders):
    reference = _run(loaders, "nostall", 0, dataset=WorkerRngValues)
    for impl, nw in (("nostall-thread", 1), ("nostall-thread", 2), ("nostall", 2)):
        try:
            assert_same_epochs(reference, _run(loaders, impl, nw, dataset=WorkerRngValues))
        except AssertionError as exc:
            raise AssertionError(f"{impl} num_workers={nw} differs from num_workers=0: {exc}") from None
    # and the values are really random per sample / epoch
    values = [v for e in reference for b in e for v in b["py"].tolist()]
    assert len(set(values)) == len(values)


def test_main_process_rng_untouched_by_workers(loaders):
    """Iterating with workers must not change the user's global RNG streams beyond
    what torch itself draws (the base seed and the sampler seed come from the generator
    here, so the global torch RNG is not used at all)."""
    import random

    import numpy as np

    for impl in PROCESS_IMPLS:
        torch.manual_seed(0)
        random.seed(0)
        np.random.seed(0)
        _run(loaders, impl, 2)
        after = (torch.rand(1).item(), random.random(), np.random.rand())
        torch.manual_seed(0)
        random.seed(0)
        np.random.seed(0)
        untouched = (torch.rand(1).item(), random.random(), np.random.rand())
        assert after == untouched, f"{impl}: global RNGs advanced by iterating the loader"
