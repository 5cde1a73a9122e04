"""Picklable datasets for ``bench_faults.py``: deterministic samples with per-sample
randomness, and variants that hang, raise, or cannot be pickled.

They live in a module of their own (not in the script) so that spawned workers
import them by name, as they would a user's dataset module.
"""

from __future__ import annotations

import os
import time

import torch
from torch.utils.data import Dataset


class Noisy(Dataset):
    """Sample ``i`` is ``[i, r, r, r]`` with ``r`` from torch's global RNG, after ``ms``
    milliseconds of sleep (a read). The random part makes a batch depend on how the
    worker that made it was seeded, so a digest of the batches shows whether a
    disturbed run delivered exactly what an undisturbed one did."""

    def __init__(self, n: int, ms: float = 2.0):
        self.n = n
        self.ms = ms

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        if self.ms:
            time.sleep(self.ms / 1000)  # sleeping, not spinning: the machine is shared
        return torch.cat([torch.tensor([float(i)]), torch.rand(3)])


def spin_forever():
    """A hung sample: a pure-Python loop that holds the GIL (as a bad regex or a livelock would)."""
    x = 0
    while True:
        x += 1


class Hangs(Noisy):
    """Sample ``bad`` never returns. With ``flag`` (a file path) only the first attempt
    hangs: it creates the file first, so a retry in a new worker returns normally
    (and returns what ``Noisy`` would)."""

    def __init__(self, n: int, bad: int, flag: str | None = None, ms: float = 2.0):
        super().__init__(n, ms)
        self.bad = bad
        self.flag = flag

    def __getitem__(self, i):
        if i == self.bad and (self.flag is None or not os.path.exists(self.flag)):
            if self.flag is not None:
                open(self.flag, "w").close()
            spin_forever()
        return super().__getitem__(i)


class Raises(Noisy):
    """Sample ``bad`` raises ``ValueError``. The message does not name the index, as real
    decode errors rarely do: naming it is the loader's job."""

    def __init__(self, n: int, bad: int, ms: float = 2.0):
        super().__init__(n, ms)
        self.bad = bad

    def __getitem__(self, i):
        if i == self.bad:
            raise ValueError("corrupt record")
        return super().__getitem__(i)


class WithLambda(Noisy):
    """A dataset holding a lambda in an attribute: fine under fork, unpicklable under spawn."""

    def __init__(self, n: int, ms: float = 2.0):
        super().__init__(n, ms)
        self.transform = {"fn": lambda x: x}

    def __getitem__(self, i):
        return self.transform["fn"](super().__getitem__(i))
