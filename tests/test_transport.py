"""Batches cross from worker processes intact, whatever their size and dtype."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset

from conftest import nostall_module
from toy_datasets import Indexed

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


# --------------------------------------------------------------------------- what torch can send


class Tagged(torch.Tensor):
    """A tensor subclass: it must arrive as itself."""


class Kinds(Dataset):
    """Samples holding every kind of tensor torch's DataLoader carries between
    processes: nested (strided and jagged), sparse COO and CSR, a subclass, views
    sharing one storage, a conjugate view, an expanded tensor, a leaf that requires
    grad, and a large one (shared memory)."""

    def __len__(self):
        return 3

    def __getitem__(self, i):
        x = torch.arange(10.0) * (i + 1)
        dense = torch.eye(3) * (i + 1)
        return {
            "nested": torch.nested.nested_tensor([torch.ones(i + 1), torch.full((2,), float(i))]),
            "jagged": torch.nested.nested_tensor([torch.ones(i + 1, 2), torch.zeros(2, 2)], layout=torch.jagged),
            "sparse": dense.to_sparse(),
            "csr": dense.to_sparse_csr(),
            "subclass": torch.arange(4.0).as_subclass(Tagged),
            "base": x,
            "view": x[2:5],
            "strided": x[::3],
            "conj": (torch.arange(3.0) * 1j + i).conj(),
            "expanded": torch.tensor([float(i)]).expand(4),
            "grad": torch.ones(2, requires_grad=True),
            "big": torch.full((300, 300), float(i)),
        }


def collate_with_views(samples):
    """A collated batch whose parts are views of one storage made in the worker."""
    stacked = torch.stack([torch.arange(6.0) + s for s in samples])
    return {"all": stacked, "first": stacked[0], "column": stacked[:, 1]}


def _same_tensor(a, b, path):
    assert type(a) is type(b), f"{path}: {type(b).__name__} != torch's {type(a).__name__}"
    assert (a.layout, a.dtype, a.is_nested, a.requires_grad) == (b.layout, b.dtype, b.is_nested, b.requires_grad), path
    if a.is_nested:
        assert all(torch.equal(x, y) for x, y in zip(a.unbind(), b.unbind(), strict=True)), path
    elif a.layout != torch.strided:
        assert torch.equal(a.to_dense(), b.to_dense()), path
    else:
        assert a.shape == b.shape and a.is_conj() == b.is_conj() and torch.equal(a, b), path


def _storage_links(batch: dict) -> dict:
    """Which parts of a batch share memory with which (by address ranges), as torch's output has them."""
    def span(t):
        start = t.untyped_storage().data_ptr()
        return start, start + t.untyped_storage().nbytes()

    dense = {k: v for k, v in batch.items() if v.layout == torch.strided and not v.is_nested}
    return {(k, j): span(v)[0] < span(w)[1] and span(w)[0] < span(v)[1]
            for k, v in dense.items() for j, w in dense.items() if k < j}


@pytest.mark.timeout(90)
@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_what_torch_can_send_arrives_as_from_torch(method):
    """Nested, sparse, subclassed and shared-storage batches go through nostall's
    transport (torch's reductions where the inline copy does not apply) and arrive
    exactly as torch's DataLoader delivers them, storage sharing included."""
    nostall = nostall_module()
    kw = dict(num_workers=1, multiprocessing_context=method)
    loader_kw = [dict(batch_size=None), dict(batch_size=2, collate_fn=collate_with_views)]
    datasets_ = [Kinds(), Indexed(6)]
    for ds, extra in zip(datasets_, loader_kw):
        ref_loader = torch.utils.data.DataLoader(ds, **kw, **extra)
        expected = list(ref_loader)
        with nostall.DataLoader(ds, **kw, **extra) as loader:
            got = list(loader)
        assert len(got) == len(expected)
        for n, (e, g) in enumerate(zip(expected, got)):
            assert e.keys() == g.keys()
            for key in e:
                _same_tensor(e[key], g[key], f"batch {n}[{key!r}] ({method})")
            assert _storage_links(g) == _storage_links(e), f"batch {n}: storage sharing differs from torch's"
        got[0]["all"].add_(1) if "all" in got[0] else got[0]["base"].add_(1)  # writable, like torch's


def collate_with_a_lock(samples):
    """A batch that cannot be pickled for the pipe (a lock), from batch 1 on."""
    import threading

    batch = torch.utils.data.default_collate(samples)
    return {"x": batch, "lock": threading.Lock()} if int(batch[0]) >= 2 else {"x": batch}


@pytest.mark.timeout(60)
def test_a_batch_that_cannot_be_pickled_raises_naming_it_and_the_worker_goes_on():
    """The worker's send fails: the batch arrives as its error (raised in the loop, with the
    batch and the pickling error); the worker goes on, so the loader can be iterated again."""
    nostall = nostall_module()
    with nostall.DataLoader(Indexed(4), batch_size=2, num_workers=1, collate_fn=collate_with_a_lock) as loader:
        it = iter(loader)
        assert next(it)["x"].tolist() == [0, 1]
        pids = loader.worker_pids()
        with pytest.raises(TypeError) as info:
            next(it)
        text = str(info.value)
        assert text.startswith("Caught TypeError in DataLoader worker process 0.")
        assert "cannot pickle '_thread.lock' object" in text
        assert "while sending batch 1 of epoch 0 (the batch could not be pickled)" in text
        assert next(iter(loader))["x"].tolist() == [0, 1]
        assert loader.worker_pids() == pids  # the same worker, still serving
