"""Datasets of ``bench_dropin.py``: the four short-run cases of issue 11 and the frames.

Each ``build(name, size)`` returns a map-style dataset whose samples are small
tensors (so the loaders' own costs show): ``png`` decodes SpotGEO-like frames
(nostall's built-in workload), ``numpy`` spends ~2 ms of CPU in numpy per sample,
``sleep`` waits 10 ms per sample (a remote read), ``dicts`` holds 2,000,000
Python dicts of metadata (the copy-on-read case) and returns one row as a tensor.
They live in a module of their own so spawned workers import them by name.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch.utils.data import Dataset

NAMES = ("png", "numpy", "sleep", "dicts")


class NumpyWork(Dataset):
    """About 2 ms of numpy per sample (small matrix products), a 64-float tensor out."""

    def __init__(self, n: int, cpu_s: float = 0.002) -> None:
        self.n, self.cpu_s = n, cpu_s

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        a = np.random.default_rng(index).standard_normal((48, 48)).astype(np.float32)
        end = time.thread_time() + self.cpu_s
        while time.thread_time() < end:
            a = np.tanh(a @ a.T * 0.02)
        return torch.from_numpy(a[0, :64].copy()), index % 10


class Sleeps(Dataset):
    """Waits ``delay_s`` (10 ms) per sample without using the CPU."""

    def __init__(self, n: int, delay_s: float = 0.010) -> None:
        self.n, self.delay_s = n, delay_s

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        time.sleep(self.delay_s)
        return torch.full((64,), float(index)), index % 10


class DictRows(Dataset):
    """``rows`` metadata dicts (2,000,000 by default) of which the first ``n`` are samples."""

    def __init__(self, n: int, rows: int = 2_000_000) -> None:
        self.n = n
        self.rows = [{"id": i, "label": i % 10, "box": [i % 7, i % 11, 32, 32]} for i in range(rows)]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        row = self.rows[index]
        return torch.tensor(row["box"], dtype=torch.float32), row["label"]


def build(name: str, size: int):
    """The dataset ``name`` (one of :data:`NAMES`) with ``size`` samples."""
    if name == "png":
        from nostall.cli._workloads import SpotGeoFrames, ensure_spotgeo

        return SpotGeoFrames(ensure_spotgeo(size), size)
    if name == "numpy":
        return NumpyWork(size)
    if name == "sleep":
        return Sleeps(size)
    if name == "dicts":
        return DictRows(size)
    raise ValueError(f"dataset must be one of {NAMES}; got {name!r}.")
