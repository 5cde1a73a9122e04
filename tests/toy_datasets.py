"""Picklable datasets, samplers and collate functions shared by the test suite.

Everything here is defined at module level so that the ``spawn`` start method can
pickle it by reference (the test directory is on ``sys.path`` of every worker,
because spawn copies the parent's ``sys.path``).
"""

from __future__ import annotations

import collections
import math
import os
import random
import signal
import time

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, Sampler, get_worker_info

Point = collections.namedtuple("Point", ["x", "y"])


def append_line(path: str, line: str) -> None:
    """Append one line to ``path`` atomically (O_APPEND, one small write)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- map-style


class Indexed(Dataset):
    """``ds[i] == i``; the simplest deterministic map-style dataset."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return i


class Rich(Dataset):
    """Samples of one kind of Python/torch/numpy value, for default_collate."""

    KINDS = ("tensor", "numpy", "int", "float", "bool", "str", "bytes", "dict",
             "namedtuple", "tuple", "list", "nested")

    def __init__(self, n: int, kind: str):
        assert kind in self.KINDS
        self.n = n
        self.kind = kind

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        k = self.kind
        if k == "tensor":
            return torch.arange(3, dtype=torch.float32) + i
        if k == "numpy":
            return np.full((2, 2), i, dtype=np.float32)
        if k == "int":
            return i
        if k == "float":
            return i * 0.5
        if k == "bool":
            return i % 3 == 0
        if k == "str":
            return f"s{i}"
        if k == "bytes":
            return b"b%d" % i
        if k == "dict":
            return {"a": i, "b": torch.tensor([i, -i]), "c": f"x{i}"}
        if k == "namedtuple":
            return Point(i, torch.tensor(float(i)))
        if k == "tuple":
            return (i, torch.full((2,), i, dtype=torch.int32))
        if k == "list":
            return [i, i * 2.0, np.int64(i)]
        # nested
        return {
            "t": (i, [torch.full((2,), i), np.int64(i)]),
            "p": Point(x=f"{i}", y={"z": i * 1.5, "arr": np.arange(i, i + 2)}),
        }


class WithGetitems(Indexed):
    """Has ``__getitems__``: torch calls it with the whole index list of a batch."""

    def __getitem__(self, i):
        return {"i": i, "via": "getitem"}

    def __getitems__(self, indices):
        return [{"i": i, "via": "getitems"} for i in indices]


class Pid(Indexed):
    """Returns (index, pid of the process that produced it)."""

    def __getitem__(self, i):
        return (i, os.getpid())


class EpochAware(Indexed):
    """``ds[i] == i + 1000 * epoch`` where epoch is set by ``set_epoch``."""

    def __init__(self, n: int):
        super().__init__(n)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, i):
        return i + 1000 * self.epoch


class RandomValues(Indexed):
    """Each sample draws from Python's, numpy's and torch's global RNGs."""

    def __getitem__(self, i):
        return {
            "i": i,
            "py": random.random(),
            "np": np.random.rand(),
            "torch": torch.rand(1),
        }


class WorkerInfoMap(Indexed):
    """Reports what ``get_worker_info()`` says inside the worker."""

    def __getitem__(self, i):
        info = get_worker_info()
        if info is None:
            return {"i": i, "id": -1, "num_workers": 0, "seed": -1, "dataset_ok": True}
        return {
            "i": i,
            "id": info.id,
            "num_workers": info.num_workers,
            "seed": info.seed,
            "dataset_ok": isinstance(info.dataset, WorkerInfoMap) and info.dataset.n == self.n,
        }


class StartLog(Indexed):
    """Appends "S <first index>" to a log file when a batch starts (``__getitems__``)."""

    def __init__(self, n: int, log_path: str):
        super().__init__(n)
        self.log_path = log_path

    def __getitems__(self, indices):
        append_line(self.log_path, f"S {indices[0] if indices else -1}")
        return list(indices)


# --------------------------------------------------------------------------- iterable


class SimpleIterable(IterableDataset):
    """Yields 0..n-1 in every worker (no sharding: duplicates with >1 worker, as torch)."""

    def __init__(self, n: int):
        self.n = n

    def __iter__(self):
        return iter(range(self.n))

    def __len__(self):
        return self.n


class ShardedIterable(IterableDataset):
    """Shards 0..n-1 between workers with ``get_worker_info()``.

    ``uneven=False``: worker w yields i with i % num_workers == w.
    ``uneven=True``: worker w yields a contiguous block whose size grows with w, so
    low-numbered workers are exhausted first (torch then skips them).
    Each sample records which worker made it.
    """

    def __init__(self, n: int, uneven: bool = False):
        self.n = n
        self.uneven = uneven

    def _shard(self, wid: int, nw: int):
        if not self.uneven:
            return range(wid, self.n, nw)
        weights = [w + 1 for w in range(nw)]
        total = sum(weights)
        bounds = [0]
        for w in weights:
            bounds.append(bounds[-1] + w)
        lo = math.floor(self.n * bounds[wid] / total)
        hi = math.floor(self.n * bounds[wid + 1] / total)
        return range(lo, hi)

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (0, 1) if info is None else (info.id, info.num_workers)
        for i in self._shard(wid, nw):
            yield {"i": i, "worker": wid if info is not None else -1}


# --------------------------------------------------------------------------- samplers / collate


class EveryOtherReversed(Sampler):
    """A custom sampler: odd indices descending, then even indices ascending."""

    def __init__(self, n: int):
        self.n = n

    def __iter__(self):
        yield from range(self.n - 1 - ((self.n - 1) % 2 == 0), -1, -2)
        yield from range(0, self.n, 2)

    def __len__(self):
        return self.n


class GrowingBatchSampler(Sampler):
    """A custom batch sampler: batches of size 1, 2, 3, ... over a shuffled-by-rule order."""

    def __init__(self, n: int):
        self.n = n

    def _batches(self):
        order = [(i * 7) % self.n for i in range(self.n)] if self.n % 7 else list(range(self.n))
        out, pos, size = [], 0, 1
        while pos < self.n:
            out.append(order[pos:pos + size])
            pos += size
            size += 1
        return out

    def __iter__(self):
        return iter(self._batches())

    def __len__(self):
        return len(self._batches())


def collate_sum(batch):
    """A custom collate_fn (module level so spawn can pickle it)."""
    if not isinstance(batch, list):  # batch_size=None: called on one sample
        return {"sum": batch * 10, "items": (batch,), "n": 1}
    return {"sum": sum(batch), "items": tuple(batch), "n": len(batch)}


def record_worker_init(worker_id: int) -> None:
    """worker_init_fn: appends "I <worker_id> <pid>" to $NOSTALL_TEST_INIT_LOG."""
    append_line(os.environ["NOSTALL_TEST_INIT_LOG"], f"I {worker_id} {os.getpid()}")


class WorkerRngValues(Indexed):
    """Draws from ``nostall.worker_rng()``: nostall's per-batch generators, which thread
    workers must use because the global RNGs are shared between threads."""

    def __getitem__(self, i):
        import nostall

        rng = nostall.worker_rng()
        assert rng is not None, "nostall.worker_rng() is None while a batch is being made"
        return {
            "i": i,
            "py": rng.random_generator.random(),
            "np": float(rng.numpy_generator.random()),
            "torch": torch.rand(1, generator=rng.torch_generator),
        }


class Sleepy(Indexed):
    """``ds[i] == i`` after waiting ``delay`` seconds, as a remote read would (the GIL
    is released, so thread workers overlap too)."""

    def __init__(self, n: int, delay: float):
        super().__init__(n)
        self.delay = delay

    def __getitem__(self, i):
        time.sleep(self.delay)
        return super().__getitem__(i)


class HangsOnce(Indexed):
    """Sample ``bad`` spins forever the first time (until the process is killed), while
    ``flag`` does not exist; it creates ``flag`` first, so a retry returns normally."""

    def __init__(self, n: int, bad: int, flag: str):
        super().__init__(n)
        self.bad = bad
        self.flag = flag

    def __getitem__(self, i):
        if i == self.bad and not os.path.exists(self.flag):
            open(self.flag, "w").close()
            spin_forever()
        return super().__getitem__(i)


def spin_forever():
    """A hung sample: a pure-Python loop that holds the GIL (as a bad regex or a livelock would)."""
    x = 0
    while True:
        x += 1


class SlowSample(Indexed):
    """Sample ``bad`` takes ``seconds`` (a thread worker cannot be stopped; this one ends)."""

    def __init__(self, n: int, bad: int, seconds: float):
        super().__init__(n)
        self.bad = bad
        self.seconds = seconds

    def __getitem__(self, i):
        if i == self.bad:
            time.sleep(self.seconds)
        return super().__getitem__(i)


class Raises(Indexed):
    """``ds[i]`` raises ``ValueError`` for every index in ``bad``."""

    def __init__(self, n: int, bad):
        super().__init__(n)
        self.bad = set(bad)

    def __getitem__(self, i):
        if i in self.bad:
            raise ValueError(f"sample {i} is corrupt")
        return super().__getitem__(i)


class RaisesGetitems(Raises):
    """The same with a batched ``__getitems__`` (which fails as a whole)."""

    def __getitems__(self, indices):
        return [self[i] for i in indices]


class Scaled(Indexed):
    """``ds[i] == i * scale``: a plain attribute with no ``set_epoch`` (torch's persistent
    workers keep the value it had at the first ``iter()``)."""

    def __init__(self, n: int):
        super().__init__(n)
        self.scale = 1

    def __getitem__(self, i):
        return i * self.scale


class SeedProbe(Indexed):
    """What a sample sees of the global RNGs: the worker, torch's initial seed, and one
    draw from each of torch's, numpy's and Python's global generators."""

    def __getitem__(self, i):
        info = get_worker_info()
        return {
            "i": i,
            "worker": info.id if info is not None else -1,
            "initial_seed": torch.initial_seed(),
            "torch": torch.rand(()).item(),
            "np": float(np.random.rand()),
            "py": random.random(),
        }


def seed_everything_12345(worker_id: int) -> None:
    """worker_init_fn: the user seeds every global generator (the same seed in every worker)."""
    torch.manual_seed(12345)
    np.random.seed(12345)
    random.seed(12345)


def seed_numpy_only(worker_id: int) -> None:
    """worker_init_fn: the classic numpy-duplicates fix, seeding numpy per worker."""
    np.random.seed(1000 + worker_id)


def draw_without_seeding(worker_id: int) -> None:
    """worker_init_fn that draws from every global generator but seeds none."""
    torch.rand(10)
    np.random.rand(1000)
    [random.random() for _ in range(1000)]
def end_this_process(how: str) -> None:
    """Die as a crashing C extension would: ``how`` is a signal name or "exit" (os._exit(3))."""
    if how == "exit":
        os._exit(3)
    os.kill(os.getpid(), getattr(signal, how))
    time.sleep(60)  # a blocked or ignored signal: never return a sample


class DiesAt(Indexed):
    """Sample ``bad`` ends its worker process every time (never use with num_workers=0);
    each attempt first appends the worker's pid to ``log``."""

    def __init__(self, n: int, bad: int, how: str, log: str):
        super().__init__(n)
        self.bad, self.how, self.log = bad, how, log

    def __getitem__(self, i):
        if i == self.bad:
            append_line(self.log, str(os.getpid()))
            end_this_process(self.how)
        return super().__getitem__(i)


class DiesAtStream(IterableDataset):
    """Yields 0..n-1 in one worker's stream and ends its process at ``bad``."""

    def __init__(self, n: int, bad: int, how: str, log: str):
        self.n, self.bad, self.how, self.log = n, bad, how, log

    def __iter__(self):
        for i in range(self.n):
            if i == self.bad:
                append_line(self.log, str(os.getpid()))
                end_this_process(self.how)
            yield i


class HangsAlways(Indexed):
    """Sample ``bad`` never finishes (each attempt appends the worker's pid to ``log``)."""

    def __init__(self, n: int, bad: int, log: str):
        super().__init__(n)
        self.bad, self.log = bad, log

    def __getitem__(self, i):
        if i == self.bad:
            append_line(self.log, str(os.getpid()))
            spin_forever()
        return super().__getitem__(i)


class TensorStream(IterableDataset):
    """Yields ``n`` tensors of ``numel`` float32 values (sample i is all i)."""

    def __init__(self, n: int, numel: int):
        self.n, self.numel = n, numel

    def __iter__(self):
        for i in range(self.n):
            yield torch.full((self.numel,), float(i))


def exit_in_worker_init(worker_id: int) -> None:
    """A worker_init_fn that ends its process, as a crashing library initialisation would."""
    os._exit(5)


class DiesOnceAt(Indexed):
    """Every sample ``i`` with ``i % every == 0`` ends its worker process the first time it
    is fetched (a file in ``flags`` remembers it), then loads normally."""

    def __init__(self, n: int, every: int, flags: str):
        super().__init__(n)
        self.every, self.flags = every, flags

    def __getitem__(self, i):
        flag = os.path.join(self.flags, f"died-{i}")
        if i % self.every == 0 and not os.path.exists(flag):
            open(flag, "w").close()
            os._exit(7)
        return super().__getitem__(i)
