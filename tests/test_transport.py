"""Batches cross from worker processes intact, whatever their size and dtype."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset

from conftest import nostall_module

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int8, torch.uint8,
          torch.int64, torch.bool, torch.complex64]


class Shapes(Dataset):
    """Sample i holds tensors of every dtype, a view, a 0-dim and an empty tensor, and
    one large tensor (above the inline limit once batched)."""

    def __len__(self):
        return 6

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        base = torch.rand(8, 6, generator=g)
        return {
            "dtypes": [(base * 100).to(dtype) for dtype in DTYPES],
            "view": base.t()[1:5, ::2],  # non-contiguous
            "scalar": torch.tensor(float(i)),
            "empty": torch.empty(0, 3),
            "large": torch.full((300, 300), float(i)),  # 360 KB per sample
        }


class Strings(Dataset):
    """Many short strings: a large result that is pickled, not shared."""

    def __len__(self):
        return 200_000

    def __getitem__(self, i):
        return f"sample-{i:09d}-" + "x" * 20


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_every_dtype_and_size_arrives_intact(method):
    nostall = nostall_module()
    expected = list(torch.utils.data.DataLoader(Shapes(), batch_size=3))
    with nostall.DataLoader(Shapes(), batch_size=3, num_workers=2, multiprocessing_context=method) as loader:
        got = list(loader)
    assert len(got) == len(expected)
    assert all(_equal(e, g) for e, g in zip(expected, got))
    got[0]["large"].add_(1)  # delivered tensors are ordinary writable tensors
    got[0]["dtypes"][0].add_(1)


@pytest.mark.timeout(60)
def test_huge_tasks_and_huge_results_do_not_deadlock():
    """Index lists of 50,000 and results of ~2 MB each way: both directions of a
    worker's pipe overflow their buffers at once unless someone keeps reading."""
    nostall = nostall_module()
    with nostall.DataLoader(Strings(), batch_size=50_000, num_workers=2, prefetch_factor=2) as loader:
        sizes = [len(batch) for batch in loader]
        assert sizes == [50_000] * 4
        assert next(iter(loader))[1] == Strings()[1]
