"""pin_memory: pins on an accelerator, warns once and goes on without one (as torch)."""

from __future__ import annotations

import warnings

import pytest
import torch

from conftest import nostall_module
from toy_datasets import Indexed

HAS_CUDA = torch.cuda.is_available()


@pytest.mark.timeout(60)
@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU-only behaviour; this machine has CUDA")
def test_warns_once_without_accelerator_and_still_loads():
    nostall = nostall_module()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            with nostall.DataLoader(Indexed(8), batch_size=4, num_workers=2, pin_memory=True) as loader:
                for _ in range(2):
                    assert [b.tolist() for b in loader] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    pin_warnings = [w for w in caught if "pin_memory" in str(w.message)]
    assert len(pin_warnings) <= 1  # once per process (an earlier test may have used it up)
    with nostall.DataLoader(Indexed(4), batch_size=2, pin_memory=True) as loader:
        assert all(not b.is_pinned() for b in loader)


@pytest.mark.timeout(120)
@pytest.mark.skipif(not HAS_CUDA, reason="pinned host memory needs a CUDA device; none on this machine")
@pytest.mark.parametrize("num_workers", [0, 2])
def test_batches_are_pinned_on_cuda(num_workers):
    nostall = nostall_module()
    with nostall.DataLoader(Indexed(8), batch_size=4, num_workers=num_workers, pin_memory=True) as loader:
        batches = list(loader)
    assert [b.tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert all(b.is_pinned() for b in batches)


@pytest.mark.timeout(120)
@pytest.mark.skipif(not HAS_CUDA, reason="pinned host memory needs a CUDA device; none on this machine")
def test_batches_are_pinned_outside_the_training_thread(monkeypatch):
    import threading

    import torch.utils.data._utils.pin_memory as torch_pin
    from nostall.core import _engine

    threads = []

    def recording_pin(data, device=None):
        threads.append(threading.current_thread().name)
        return torch_pin.pin_memory(data, device)

    monkeypatch.setattr(_engine, "_pin", recording_pin)
    nostall = nostall_module()
    with nostall.DataLoader(Indexed(64), batch_size=4, num_workers=2, pin_memory=True) as loader:
        assert all(b.is_pinned() for b in loader)
    assert threads and all(name.startswith("nostall-pin") for name in threads)


def test_pinner_pins_in_its_thread_and_raises_in_take():
    """The mechanics of pinning ahead, on CPU: here the "pin" is a copy that records
    the thread it ran in (torch's pin needs an accelerator)."""
    import threading

    from nostall.core._pinning import Pinner

    ran_in = []
    gate = threading.Event()

    def copy(data):
        ran_in.append(threading.current_thread().name)
        if isinstance(data, str):
            raise RuntimeError(f"cannot pin {data}")
        gate.wait(10)
        return data.clone()

    pinner = Pinner(copy)
    a = torch.arange(3)
    pinner.start(1, a)
    pinner.start(2, "bad")
    pinner.start(3, torch.arange(2))
    gate.set()
    got = pinner.take(1, a)
    assert torch.equal(got, a) and got is not a
    with pytest.raises(RuntimeError, match="cannot pin bad"):
        pinner.take(2, "bad")
    pinner.keep_only([])  # batch 3 will not be delivered: forgotten
    b = torch.arange(5)
    assert torch.equal(pinner.take(3, b), b)  # not pending any more: pinned in the caller
    assert ran_in[:2] == ["nostall-pin_0", "nostall-pin_0"] and ran_in[-1] == threading.current_thread().name
    pinner.close()
    pinner.start(4, a)  # a closed pinner starts again (a loader iterated after close())
    assert torch.equal(pinner.take(4, a), a)
    pinner.close()
