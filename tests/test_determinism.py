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

import random
import warnings

import numpy as np
import pytest
import torch

from conftest import PROCESS_IMPLS, assert_same_epochs, run_epochs
from toy_datasets import (RandomValues, SeedProbe, WorkerRngValues, draw_without_seeding, seed_everything_12345,
                          seed_numpy_only)

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


# --------------------------------------------------------------------------- worker_init_fn seeds


def _per_worker(batches) -> dict:
    """Each worker's samples in the order it made them (in-order delivery, FIFO workers)."""
    out: dict = {}
    for batch in batches:
        for k in range(len(batch["i"])):
            out.setdefault(int(batch["worker"][k]), []).append(
                {key: batch[key][k].item() for key in ("initial_seed", "torch", "np", "py")})
    return out


def _seeded_sequence(n: int) -> list:
    """What n successive samples draw after torch/np/random.seed(12345) in one process."""
    gen = torch.Generator().manual_seed(12345)
    rs = np.random.RandomState(12345)
    py = random.Random(12345)
    return [{"initial_seed": 12345, "torch": torch.rand((), generator=gen).item(), "np": float(rs.rand()),
             "py": py.random()} for _ in range(n)]


@pytest.mark.parametrize("impl", PROCESS_IMPLS)
def test_worker_init_fn_seed_wins_as_in_torch(impl, loaders):
    """torch.manual_seed / np.random.seed / random.seed in worker_init_fn: inside that
    worker, torch.initial_seed() is the user's seed and the samples draw the user's
    seeded sequences, continuing across batches, in torch's workers and in nostall's."""
    loader = loaders.make(impl, SeedProbe(12), batch_size=2, num_workers=2,
                          worker_init_fn=seed_everything_12345)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        per_worker = _per_worker(list(loader))
    assert sorted(per_worker) == [0, 1]
    for worker, samples in per_worker.items():
        assert samples == _seeded_sequence(len(samples)), f"worker {worker}"
    reseed_warnings = [w for w in caught if "worker_init_fn seeded" in str(w.message)]
    if impl == "nostall":
        assert len(reseed_warnings) == 1, [str(w.message) for w in caught]
        text = str(reseed_warnings[0].message)
        assert "torch.manual_seed" in text and "np.random.seed" in text and "random.seed" in text
        assert "depend on which worker" in text
        with warnings.catch_warnings(record=True) as again:  # once per loader, not per epoch
            warnings.simplefilter("always")
            list(loader)
        assert not [w for w in again if "worker_init_fn seeded" in str(w.message)]


def test_only_the_generators_worker_init_fn_seeded_are_left_alone(loaders):
    """Seeding numpy in worker_init_fn leaves torch's and Python's draws seeded per
    batch by nostall: those stay the same for any number of workers."""
    def values(nw, init):
        loader = loaders.make("nostall", SeedProbe(12), batch_size=2, num_workers=nw, worker_init_fn=init,
                              generator=torch.Generator().manual_seed(3))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return [(b["torch"].tolist(), b["py"].tolist(), b["np"].tolist()) for b in loader]

    plain, seeded_one, seeded_two = values(1, None), values(1, seed_numpy_only), values(2, seed_numpy_only)
    assert [v[:2] for v in seeded_two] == [v[:2] for v in seeded_one] == [v[:2] for v in plain]
    assert [v[2] for v in seeded_one] != [v[2] for v in plain]  # numpy: the user's seed


def test_worker_init_fn_that_only_draws_is_not_seeding(loaders):
    """Drawing in worker_init_fn is not seeding: nostall keeps its per-batch seeds, no warning."""
    def values(init):
        loader = loaders.make("nostall", SeedProbe(8), batch_size=2, num_workers=2, worker_init_fn=init,
                              generator=torch.Generator().manual_seed(3))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = [{k: v.tolist() for k, v in b.items() if k != "worker"} for b in loader]
        assert not [w for w in caught if "worker_init_fn seeded" in str(w.message)]
        return out

    assert values(draw_without_seeding) == values(None)
