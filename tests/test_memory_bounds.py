"""Memory: the in-flight window bounded in bytes, and the one-time copy-on-read warning."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils.data import Dataset

import nostall
import nostall.core._engine as engine_module

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


# --------------------------------------------------------------------------- no growth with the batch count


class Tiny(Dataset):
    """``ds[i] == i``: the cheapest sample, so 20,000 batches take a second or two."""

    def __init__(self, n: int = 1000):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i


def _growth(loader, first: int = 5_000, last: int = 20_000) -> int:
    """Bytes allocated in nostall's modules and still held after ``last`` batches, minus
    those held after ``first`` (tracemalloc; as many epochs as it takes)."""
    import gc
    import os
    import tracemalloc

    keep = [tracemalloc.Filter(True, os.path.join(os.path.dirname(nostall.__file__), "*"))]
    tracemalloc.start(1)
    try:
        held, n = {}, 0
        while n < last:
            for _ in loader:
                n += 1
                if n in (first, last):
                    gc.collect()
                    held[n] = sum(s.size for s in tracemalloc.take_snapshot().filter_traces(keep).statistics("filename"))
                    if n == last:
                        break
    finally:
        tracemalloc.stop()
    return held[last] - held[first]


@pytest.mark.parametrize("worker_type", ["thread", "process"])
def test_nothing_kept_per_batch_without_stats(worker_type):
    """stats=False: 15,000 more batches (15 epochs, persistent workers) hold nothing more."""
    with nostall.DataLoader(Tiny(), batch_size=1, num_workers=2, persistent_workers=True,
                            worker_type=worker_type, stats=False) as loader:
        assert _growth(loader) < 200_000


def test_out_of_order_delivery_ledger_stays_small():
    """in_order=False keeps the batches delivered this epoch for state_dict(): a prefix and
    the few delivered after a gap, not one entry per batch of a 20,000-batch epoch."""
    with nostall.DataLoader(Tiny(20_000), batch_size=1, num_workers=2, in_order=False,
                            worker_type="thread", stats=False) as loader:
        assert _growth(loader) < 200_000
        state = loader.state_dict()
    assert state["delivered"] == 0 and state["epoch"] == 1  # the epoch had ended: the next starts afresh


def test_stats_keep_the_latest_batches_and_epochs(monkeypatch):
    """stats=True: the trace keeps the latest batches (``_TIMELINE_LIMIT``, lowered here
    so the rings are full by batch 5,000) and the latest epochs; past that nothing grows."""
    monkeypatch.setattr(nostall.observe._stats, "_TIMELINE_LIMIT", 4_096)
    monkeypatch.setattr(nostall.observe._stats, "_EPOCHS_KEPT", 4)
    with nostall.DataLoader(Tiny(), batch_size=1, num_workers=2, persistent_workers=True, worker_type="thread") as loader:
        assert _growth(loader, 5 * 1024, 20 * 1024) < 200_000  # (whole chunks of 1,024 records at both)
        stats = loader.stats
        # 4 finished epochs kept, then epoch 19 (its last batch taken, StopIteration not yet asked for)
        assert [e.number for e in stats.epochs] == [16, 17, 18, 19, 20] and not stats.epochs[-1].complete
        assert stats.batches == 20 * 1024 and stats.time_to_first_batch_s is not None
        assert 4_096 <= len(loader._recorder.timeline) <= 4_096 + 2 * 1_024


def test_ring_holds_the_latest_records_in_a_few_megabytes():
    """The default trace capacity: 60,000 batches of loop and worker records stay
    within ~3.5 MB (64 bytes a batch packed, and up to a chunk of tuples) and iterate
    oldest first."""
    import tracemalloc

    from nostall.observe._stats import _TIMELINE_LIMIT, _Ring

    tracemalloc.start(1)
    try:
        loop, spans = _Ring(3, _TIMELINE_LIMIT), _Ring(5, _TIMELINE_LIMIT)
        for i in range(60_000):
            loop.append((0, i, i + 0.5))
            spans.append((1, 0, i, i, i + 0.25))
        size, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert size < (_TIMELINE_LIMIT + _Ring.CHUNK) * 64 * 1.05 + _Ring.CHUNK * 400 < 4 * 2**20
    got = list(loop)
    assert _TIMELINE_LIMIT <= len(got) == len(loop) <= _TIMELINE_LIMIT + 2 * _Ring.CHUNK
    assert tuple(map(float, got[-1])) == (0.0, 59_999.0, 59_999.5) == tuple(map(float, loop[-1]))
    assert [t[1] for t in got] == list(range(60_000 - len(got), 60_000))


def test_out_of_order_ledger_with_a_gap_resumes_every_batch_exactly_once():
    """The ledger compacted to a prefix and a sparse set still saves exactly which batches
    were delivered: batch 1 is slow, later ones are delivered before it; saved then, a new
    loader delivers batch 1 and the rest, each index once, and saving again at once gives
    the same list."""
    from toy_datasets import SlowSample

    dataset = SlowSample(80, bad=4, seconds=1.0)  # batch 1 (indices 4-7) arrives last
    with nostall.DataLoader(dataset, batch_size=4, num_workers=2, in_order=False) as loader:
        it = iter(loader)
        part = [next(it).tolist() for _ in range(6)]
        state = loader.state_dict()
    assert [4, 5, 6, 7] not in part  # a gap after batch 0 (batches queued behind it wait too)
    assert state["delivered"] == sorted(b[0] // 4 for b in part)
    with nostall.DataLoader(dataset, batch_size=4, num_workers=2, in_order=False) as again:
        again.load_state_dict(state)
        assert again.state_dict()["delivered"] == state["delivered"]
        rest = [b.tolist() for b in again]
    assert sorted(i for b in part + rest for i in b) == list(range(80))
