"""on_sample_error="skip": the limit is counted as batches are delivered, so every good
batch before the one that goes over it reaches the loop first (as torch's batches
without the failing samples), and the error says what the fraction allows."""

from __future__ import annotations

import pytest
import torch
from toy_datasets import Indexed, Raises

import nostall
from nostall.control._supervise import allowed_skips

pytestmark = pytest.mark.timeout(60)

IMPLS = [dict(num_workers=0), dict(num_workers=2), dict(num_workers=2, worker_type="thread")]


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _torch_batches(n: int, batch_size: int, seed: int) -> list[list[int]]:
    loader = torch.utils.data.DataLoader(Indexed(n), batch_size=batch_size, shuffle=True, generator=_gen(seed))
    return [b.tolist() for b in loader]


def _expected_before_error(batches: list, bad: set, allowed: int) -> tuple[list, int]:
    """torch's batches without the failing samples (an all-failing batch is passed over),
    up to the batch whose failures take the count over ``allowed``; and that batch's number."""
    count, out = 0, []
    for batch_no, batch in enumerate(batches):
        count += sum(i in bad for i in batch)
        if count > allowed:
            return out, batch_no
        kept = [i for i in batch if i not in bad]
        if kept:
            out.append(kept)
    raise AssertionError("the limit is never exceeded")


def _until_error(loader) -> tuple[list, str]:
    got = []
    with pytest.raises(RuntimeError) as err:
        for batch in loader:
            got.append(batch.tolist())
    return got, str(err.value)


@pytest.mark.parametrize("kw", IMPLS, ids=["inline", "process", "thread"])
def test_64_samples_at_one_percent_deliver_the_good_batches_first(kw):
    """The issue's case: 0.01 of 64 samples allows none. The batches before the failing
    sample's batch are delivered as torch's; the error names the limit, index and error."""
    batches = _torch_batches(64, 4, seed=3)
    bad = batches[5][2]  # a sample of batch 5: batches 0-4 are good
    loader = nostall.DataLoader(Raises(64, bad=[bad]), batch_size=4, shuffle=True, generator=_gen(3),
                                on_sample_error="skip", **kw)
    got, text = _until_error(loader)
    expected, failing = _expected_before_error(batches, {bad}, allowed=0)
    assert failing == 5 and got == expected == batches[:5]
    assert ("epoch 0: 1 sample failed and was skipped; max_skipped_fraction=0.01 allows 0 of this epoch's "
            "64 samples (skipping goes on while skipped <= fraction x samples)") in text
    assert f"Skipped sample indices: [{bad}]." in text
    assert f"First error, sample index {bad} (batch 5): ValueError: sample {bad} is corrupt (toy_datasets.py:" in text
    assert "Every batch before batch 5 was delivered, without its failing samples" in text
    assert "raise max_skipped_fraction (0.0156 or more allows this one)" in text
    loader.close()


@pytest.mark.parametrize("kw", IMPLS, ids=["inline", "process", "thread"])
def test_limit_reached_mid_epoch_delivers_torchs_batches_minus_failing_samples(kw):
    """0.05 of 100 samples allows 5: the batches with the first five failures come with
    those samples left out; the batch with the sixth raises, naming every skipped index."""
    batches = _torch_batches(100, 5, seed=1)
    bad = {batches[b][p] for b, p in [(1, 0), (2, 4), (4, 1), (4, 2), (6, 3), (9, 0), (9, 1), (12, 2), (15, 0)]}
    bad |= set(batches[7])  # batch 7 fails as a whole: passed over
    loader = nostall.DataLoader(Raises(100, bad=bad), batch_size=5, shuffle=True, generator=_gen(1),
                                on_sample_error="skip", max_skipped_fraction=0.05, **kw)
    got, text = _until_error(loader)
    expected, failing = _expected_before_error(batches, bad, allowed=5)
    assert failing == 7  # 1 + 1 + 2 + 1 = 5 before it
    assert got == expected
    skipped = [i for b in batches[:failing + 1] for i in b if i in bad]
    assert "10 samples failed and were skipped; max_skipped_fraction=0.05 allows 5 of this epoch's 100 samples" in text
    assert f"Skipped sample indices: {skipped}." in text
    assert f"First error, sample index {batches[1][0]} (batch 1)" in text
    assert [s["index"] for s in loader.stats.skipped] == skipped
    loader.close()


class _Batches:
    """A batch sampler without ``__len__``: the epoch's length is unknown in advance."""

    def __init__(self, n: int, size: int):
        self.n, self.size = n, size

    def __iter__(self):
        return iter([list(range(i, min(i + self.size, self.n))) for i in range(0, self.n, self.size)])


@pytest.mark.parametrize("kw", IMPLS[:2], ids=["inline", "process"])
def test_epoch_of_unknown_length_is_checked_against_its_total_at_its_end(kw):
    """Length unknown: during the epoch the fraction applies to the samples read so far
    (at least 1,000, so 0.01 allows 10); at its end, to its total (40 samples allow 0):
    every good batch is delivered, then the error."""
    loader = nostall.DataLoader(Raises(40, bad=[6, 33]), batch_sampler=_Batches(40, 4), on_sample_error="skip", **kw)
    got, text = _until_error(loader)
    assert got == [[i for i in range(b, b + 4) if i not in (6, 33)] for b in range(0, 40, 4)]
    assert ("2 samples failed and were skipped; max_skipped_fraction=0.01 allows 0 of the 40 samples this "
            "epoch held (its length was not known in advance)") in text
    assert "Skipped sample indices: [6, 33]." in text and "Every batch of the epoch was delivered" in text
    loader.close()


def test_within_the_limit_every_epoch_completes():
    """skipped <= fraction x samples goes on: 0.05 of 100 allows exactly 5, every epoch."""
    with nostall.DataLoader(Raises(100, bad=range(0, 100, 20)), batch_size=5, num_workers=2,
                            persistent_workers=True, on_sample_error="skip", max_skipped_fraction=0.05) as loader:
        for _ in range(3):
            assert sum(len(b) for b in loader) == 95
        assert "samples skipped: 15" in str(loader.stats)


def test_allowed_skips_is_the_floor_of_fraction_times_samples():
    assert allowed_skips(0.01, 64) == 0 and allowed_skips(0.01, 100) == 1 and allowed_skips(0.29, 100) == 29
    assert allowed_skips(0.0, 10**6) == 0 and allowed_skips(1.0, 7) == 7 and allowed_skips(0.1, 30) == 3
