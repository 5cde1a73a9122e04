"""Thread workers carry torch's thread-worker fields (issue 15 §3).

torch 2.13's ``WorkerInfo`` has ``worker_method`` and ``rng``, and
``torch.thread_safe_generator()`` returns ``get_worker_info().rng.torch_generator`` in a
thread worker (``None`` in a process worker or the main process). torch's own DataLoader
has no thread workers yet, so its process workers are the reference for what a process
worker says, and nostall's process workers for what a thread worker draws: the thread's
generators are seeded per batch with the seed that seeds the globals in a process
worker, so the same transform draws the same numbers in either kind of worker.
"""

from __future__ import annotations

import random

import pytest
import torch
from torch.utils.data import Dataset, get_worker_info

import nostall


class Draws(Dataset):
    """Each sample: its index, a torch draw and a Python draw from the thread-safe
    generators, and what ``get_worker_info()`` says."""

    def __len__(self):
        return 48

    def __getitem__(self, i):
        g = torch.thread_safe_generator()
        info = get_worker_info()
        rng = info.rng if info is not None and info.rng is not None else None
        py = rng.random_generator if rng is not None else random
        return {
            "index": i,
            "torch": torch.randint(0, 2**30, (1,), generator=g).item(),
            "python": py.randrange(2**30),
            "method": info.worker_method if info is not None else "main",
            "has_generator": g is not None,
        }


def _samples(loader) -> list:
    return [dict(zip(b, vals)) for b in loader
            for vals in zip(*(b[k].tolist() if torch.is_tensor(b[k]) else b[k] for k in b))]


def _draws(samples) -> list:
    return [(s["index"], s["torch"], s["python"]) for s in samples]


@pytest.mark.timeout(60)
def test_process_workers_say_what_torchs_say():
    kw = dict(batch_size=4, num_workers=2, shuffle=True)
    ours = _samples(nostall.DataLoader(Draws(), generator=torch.Generator().manual_seed(3), **kw))
    theirs = _samples(torch.utils.data.DataLoader(Draws(), generator=torch.Generator().manual_seed(3), **kw))
    assert {s["method"] for s in ours} == {s["method"] for s in theirs} == {"multiprocessing"}
    assert not any(s["has_generator"] for s in ours + theirs)
    assert [s["index"] for s in ours] == [s["index"] for s in theirs]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("num_workers", [1, 2, 3])
def test_thread_workers_draw_what_process_workers_draw(num_workers):
    kw = dict(batch_size=4, shuffle=True)
    threads = _samples(nostall.DataLoader(Draws(), num_workers=num_workers, worker_type="thread",
                                          generator=torch.Generator().manual_seed(5), **kw))
    processes = _samples(nostall.DataLoader(Draws(), num_workers=2, worker_type="process",
                                            generator=torch.Generator().manual_seed(5), **kw))
    assert {s["method"] for s in threads} == {"thread"}
    assert all(s["has_generator"] for s in threads)
    assert _draws(threads) == _draws(processes)
    assert len({s["torch"] for s in threads}) > 40  # draws differ between samples


def _record_init(worker_id):
    info = get_worker_info()
    expected = torch.randint(0, 2**30, (3,), generator=torch.Generator().manual_seed(info.seed))
    got = torch.randint(0, 2**30, (3,), generator=torch.thread_safe_generator())
    info.dataset.seen[worker_id] = (info.id, info.num_workers, info.worker_method, torch.equal(got, expected))


class Seen(Draws):
    def __init__(self):
        self.seen = {}


@pytest.mark.timeout(60)
def test_worker_init_fn_sees_the_fields_and_a_generator_seeded_with_the_worker_seed():
    dataset = Seen()
    loader = nostall.DataLoader(dataset, batch_size=4, num_workers=2, worker_type="thread", worker_init_fn=_record_init)
    assert len(list(loader)) == 12
    # Thread workers share the dataset object: worker_init_fn wrote into it.
    assert dataset.seen == {0: (0, 2, "thread", True), 1: (1, 2, "thread", True)}
    loader.close()
    assert torch.thread_safe_generator() is None  # the main thread is no worker
