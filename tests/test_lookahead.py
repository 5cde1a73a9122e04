"""The next epoch is prepared while the current one finishes, and kept when the
prediction holds (nostall only: torch does not prepare epochs ahead)."""

from __future__ import annotations

import os
import time

import pytest
import torch
from torch.utils.data import Dataset, DistributedSampler

from conftest import nostall_module

N, BATCH, WORKERS, PREFETCH, EPOCHS = 40, 4, 2, 2, 4
PER_EPOCH = N // BATCH


class MadeLog(Dataset):
    """Logs "<epoch attribute> <first index>" for every batch a worker makes."""

    def __init__(self, path: str):
        self.path = path
        self.epoch = 0

    def __len__(self):
        return N

    def __getitems__(self, indices):
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{self.epoch} {indices[0]}\n".encode())
        finally:
            os.close(fd)
        return [i + 1000 * self.epoch for i in indices]


class EpochMadeLog(MadeLog):
    """MadeLog whose epoch is set by the training loop."""

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


def _made(path) -> list[str]:
    try:
        with open(path) as f:
            return f.read().split("\n")[:-1]
    except FileNotFoundError:
        return []


SCENARIOS = ("shuffle-global-rng", "generator", "distributed-set-epoch", "dataset-set-epoch")


def _loader(scenario, ds):
    nostall = nostall_module()
    kwargs = dict(batch_size=BATCH, num_workers=WORKERS, prefetch_factor=PREFETCH,
                  multiprocessing_context="fork")
    if scenario == "shuffle-global-rng":
        return nostall.DataLoader(ds, shuffle=True, **kwargs), None
    if scenario == "generator":
        return nostall.DataLoader(ds, shuffle=True, generator=torch.Generator().manual_seed(3), **kwargs), None
    if scenario == "distributed-set-epoch":
        sampler = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=5)
        return nostall.DataLoader(ds, sampler=sampler, **kwargs), sampler
    return nostall.DataLoader(ds, **kwargs), ds


@pytest.mark.timeout(60)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_work_prepared_ahead_is_kept_when_the_prediction_holds(scenario, tmp_path):
    log = str(tmp_path / "made.log")
    ds = (EpochMadeLog if scenario == "dataset-set-epoch" else MadeLog)(log)
    loader, epoch_owner = _loader(scenario, ds)
    with loader:
        for epoch in range(EPOCHS):
            if epoch_owner is not None:
                epoch_owner.set_epoch(epoch)
            values = [v for batch in loader for v in batch.tolist()]
            assert sorted(v % 1000 for v in values) == list(range(N))
            if scenario == "dataset-set-epoch":
                assert {v // 1000 for v in values} == {epoch}
    made = _made(log)
    # Every epoch's batches, plus at most one window prepared for an epoch that never came.
    assert EPOCHS * PER_EPOCH <= len(made) <= EPOCHS * PER_EPOCH + WORKERS * PREFETCH, made


@pytest.mark.timeout(60)
def test_next_epoch_starts_before_iter_is_called(tmp_path):
    """After the last batch of epoch 0 is taken, workers make epoch 1's first batches
    (with the dataset epoch predicted as 1) without waiting for iter(loader)."""
    log = str(tmp_path / "made.log")
    ds = EpochMadeLog(log)
    loader, _ = _loader("dataset-set-epoch", ds)
    with loader:
        ds.set_epoch(0)
        assert len(list(loader)) == PER_EPOCH
        deadline = time.monotonic() + 20
        while sum(line.startswith("1 ") for line in _made(log)) < WORKERS and time.monotonic() < deadline:
            time.sleep(0.01)  # polling a file the workers write; the event is their write
        ahead = [line for line in _made(log) if line.startswith("1 ")]
        assert len(ahead) >= WORKERS, _made(log)
        ds.set_epoch(1)
        assert sorted(v for b in loader for v in b.tolist()) == [1000 + i for i in range(N)]
        made_before = len(_made(log))
        ds.set_epoch(7)  # not the predicted 2: what was prepared is thrown away
        assert sorted(v for b in loader for v in b.tolist()) == [7000 + i for i in range(N)]
        assert len(_made(log)) > made_before
