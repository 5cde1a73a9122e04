"""nostall.to_device: batches on the device, copied ahead, resume exact (issue 15 §4).

The lookahead, the bound and the resume bookkeeping are the same code for every
device and are tested on the CPU path; the CUDA copy (side stream, pinned source,
``record_stream``) needs a GPU and is skipped here with that reason.
"""

from __future__ import annotations

import pytest
import torch
from toy_datasets import Indexed

import nostall


class Counting:
    """A loader stand-in that counts the batches taken from it (a plain iterable, as
    to_device accepts any loader)."""

    def __init__(self, loader):
        self.loader = loader
        self.taken = 0

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            self.taken += 1
            yield batch


@pytest.mark.timeout(60)
def test_cpu_gives_torchs_batches_without_copying():
    kw = dict(batch_size=8, shuffle=True, num_workers=2)
    theirs = torch.utils.data.DataLoader(Indexed(100), generator=torch.Generator().manual_seed(1), **kw)
    expected = [list(theirs) for _ in range(2)]
    with nostall.to_device(nostall.DataLoader(Indexed(100), generator=torch.Generator().manual_seed(1), **kw),
                           "cpu") as loader:
        assert len(loader) == len(expected[0])
        got = [list(loader) for _ in range(2)]  # every iter() is a new epoch, as the loader's
    for e in range(2):
        assert [b.tolist() for b in got[e]] == [b.tolist() for b in expected[e]]
    batch = torch.arange(4)
    assert next(iter(nostall.to_device([batch], "cpu"))) is batch  # CPU tensors stay where they are


@pytest.mark.timeout(60)
def test_loader_stats_report_the_hand_off():
    with nostall.to_device(nostall.DataLoader(Indexed(64), batch_size=4, num_workers=2), "cpu") as loader:
        assert loader.stats.device is None  # nothing handed over yet
        for _ in loader:
            pass
        device = loader.stats.device
        assert device["batches"] == 16 and device["copy_s"] > 0 and device["wait_s"] == 0.0  # no CUDA event to wait on
        assert device["copy_s"] == pytest.approx(loader.copy_seconds)
        scalars = loader.stats.scalars()
        assert scalars["nostall/device_copy_ms"] == pytest.approx(1000 * loader.copy_seconds / 16)
        assert scalars["nostall/device_wait_ms"] == 0.0
        assert "copies to the device: 16 batches" in str(loader.stats)
        assert loader.stats.to_dict()["device"] == device
        for _ in loader:  # the next window holds the next epoch's copies only
            break
        assert set(loader.stats.scalars()) >= {"nostall/device_copy_ms", "nostall/device_wait_ms"}
    with nostall.DataLoader(Indexed(8), batch_size=4) as plain:
        list(plain)
        assert plain.stats.device is None and "nostall/device_copy_ms" not in plain.stats.scalars()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("prefetch", [1, 2, 5])
def test_at_most_prefetch_batches_ahead(prefetch):
    source = Counting(nostall.DataLoader(Indexed(64), batch_size=4, num_workers=2))
    ahead = []
    for k, _ in enumerate(nostall.to_device(source, "cpu", prefetch=prefetch), start=1):
        ahead.append(source.taken - k)
    assert max(ahead) == prefetch and min(ahead) == 0
    assert source.taken == 16


@pytest.mark.timeout(90)
@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_describes_what_the_loop_received(num_workers):
    def make():
        return nostall.to_device(nostall.DataLoader(Indexed(80), batch_size=4, shuffle=True, num_workers=num_workers,
                                                    generator=torch.Generator().manual_seed(7)), "cpu", prefetch=3)

    with make() as full:
        expected = [b.tolist() for b in full]
    with make() as first:
        it = iter(first)
        seen = [next(it).tolist() for _ in range(7)]  # 3 more are already taken ahead
        state = first.state_dict()
    with make() as second:
        second.load_state_dict(state)
        rest = [b.tolist() for b in second]
    assert seen + rest == expected


def test_bad_arguments_name_themselves():
    loader = [torch.zeros(1)]
    with pytest.raises(ValueError, match=r"to_device\(prefetch=0\)"):
        nostall.to_device(loader, "cpu", prefetch=0)
    with pytest.raises(ValueError, match=r"to_device\(device='gpu'\): not a torch device"):
        nostall.to_device(loader, "gpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match=r"torch.cuda.is_available\(\) is False.*device='cpu'"):
            nostall.to_device(loader, "cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the copy on a side CUDA stream needs a CUDA device; none on this machine")
@pytest.mark.timeout(60)
def test_cuda_batches_arrive_on_the_device_equal_to_the_host_ones():
    kw = dict(batch_size=8, num_workers=2, pin_memory=True)
    host = list(nostall.DataLoader(Indexed(64), **kw))
    with nostall.to_device(nostall.DataLoader(Indexed(64), **kw), "cuda", prefetch=2) as loader:
        moved = list(loader)
    assert all(b.is_cuda for b in moved)
    assert all(torch.equal(a, b.cpu()) for a, b in zip(host, moved))
