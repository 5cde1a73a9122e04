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
