"""Memory: the in-flight window bounded in bytes, and the one-time copy-on-read warning."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils.data import Dataset

import nostall
import nostall._engine as engine_module

pytestmark = pytest.mark.timeout(60)


class MegabyteSamples(Dataset):
    def __len__(self):
        return 40

    def __getitem__(self, i):
        return torch.full((256, 1024), float(i))  # 1 MB


def test_window_bounded_in_bytes():
    # 2 MB batches, window 4 x 2 = 8 batches, budget 5 MB: at most 2 in flight once known.
    with nostall.DataLoader(MegabyteSamples(), batch_size=2, num_workers=4, max_inflight_bytes=5 * 2**20) as loader:
        got = [float(b[:, 0, 0].sum()) for b in loader]
        flight = loader.stats.in_flight
    assert got == [float(2 * i + 2 * i + 1) for i in range(20)]
    assert flight["max"] <= 4  # before the first batch: one per worker; after: 2
    with nostall.DataLoader(MegabyteSamples(), batch_size=2, num_workers=4) as loader:
        list(loader)
        assert loader.stats.in_flight["max"] > 4  # without the budget the window is 8


def test_max_inflight_bytes_is_validated():
    with pytest.raises(ValueError, match=r"`max_inflight_bytes` must be None or an int > 0 \(bytes\); got 0"):
        nostall.DataLoader(MegabyteSamples(), num_workers=1, max_inflight_bytes=0)


class ManyDicts(Dataset):
    def __init__(self, n):
        self.samples = [{"path": f"images/{i:07d}.jpg", "label": i % 10} for i in range(n)]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]["label"]


def test_large_python_containers_are_pointed_to_flat_once(monkeypatch):
    monkeypatch.setattr(engine_module, "_warned_copy_on_read", False)
    dataset = ManyDicts(300_000)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            with nostall.DataLoader(dataset, batch_size=5000, num_workers=2) as loader:
                next(iter(loader))
    messages = [str(w.message) for w in caught if "nostall.flat" in str(w.message)]
    assert len(messages) == 1
    assert "dataset.samples is a list of 300,000 Python objects" in messages[0]
    assert "`self.samples = nostall.flat(self.samples)`" in messages[0]
    # Flat containers are not warned about.
    monkeypatch.setattr(engine_module, "_warned_copy_on_read", False)
    dataset.samples = nostall.flat(dataset.samples)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with nostall.DataLoader(dataset, batch_size=5000, num_workers=2) as loader:
            next(iter(loader))
    assert not [w for w in caught if "nostall.flat" in str(w.message)]
