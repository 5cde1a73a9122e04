"""Contract 1 - arguments: what torch rejects, nostall rejects with the same exception type."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import BatchSampler, SequentialSampler

from conftest import PROCESS_IMPLS, nostall_module
from toy_datasets import EveryOtherReversed, Indexed, SimpleIterable

N = 10


def _bs():
    return BatchSampler(SequentialSampler(range(N)), batch_size=3, drop_last=False)


# (id, dataset factory, kwargs factory, expected exception type)
INVALID = [
    ("batch_sampler+batch_size", Indexed, lambda: dict(batch_sampler=_bs(), batch_size=2), ValueError),
    ("batch_sampler+shuffle", Indexed, lambda: dict(batch_sampler=_bs(), shuffle=True), ValueError),
    ("batch_sampler+sampler", Indexed, lambda: dict(batch_sampler=_bs(), sampler=EveryOtherReversed(N)), ValueError),
    ("batch_sampler+drop_last", Indexed, lambda: dict(batch_sampler=_bs(), drop_last=True), ValueError),
    ("sampler+shuffle", Indexed, lambda: dict(sampler=EveryOtherReversed(N), shuffle=True), ValueError),
    ("negative num_workers", Indexed, lambda: dict(num_workers=-1), ValueError),
    ("negative timeout", Indexed, lambda: dict(timeout=-1), ValueError),
    ("prefetch_factor without workers", Indexed, lambda: dict(prefetch_factor=2), ValueError),
    ("negative prefetch_factor", Indexed, lambda: dict(num_workers=2, prefetch_factor=-1), ValueError),
    ("persistent_workers without workers", Indexed, lambda: dict(persistent_workers=True), ValueError),
    ("iterable+shuffle", SimpleIterable, lambda: dict(shuffle=True), ValueError),
    ("iterable+sampler", SimpleIterable, lambda: dict(sampler=EveryOtherReversed(N)), ValueError),
    ("iterable+batch_sampler", SimpleIterable, lambda: dict(batch_sampler=_bs()), ValueError),
    ("bad start method string", Indexed, lambda: dict(num_workers=2, multiprocessing_context="bogus"), ValueError),
    ("start method not a context", Indexed, lambda: dict(num_workers=2, multiprocessing_context=123), TypeError),
    ("start method without workers", Indexed, lambda: dict(multiprocessing_context="fork"), ValueError),
    ("batch_size=None+drop_last", Indexed, lambda: dict(batch_size=None, drop_last=True), ValueError),
    ("batch_size=0", Indexed, lambda: dict(batch_size=0), ValueError),
    ("negative batch_size", Indexed, lambda: dict(batch_size=-3), ValueError),
    ("float batch_size", Indexed, lambda: dict(batch_size=2.5), ValueError),
    ("non-bool drop_last", Indexed, lambda: dict(drop_last="yes"), ValueError),
    ("shuffle empty dataset", lambda n: Indexed(0), lambda: dict(shuffle=True), ValueError),
]


@pytest.mark.parametrize("impl", PROCESS_IMPLS)
@pytest.mark.parametrize("make_ds,make_kw,exc", [pytest.param(*c[1:], id=c[0]) for c in INVALID])
def test_invalid_combination_rejected(impl, make_ds, make_kw, exc, loaders):
    ds = make_ds(N)
    with pytest.raises(exc) as info:
        loaders.make(impl, ds, **make_kw())
    # Exactly the type torch uses, not a subclass such as a custom error.
    assert type(info.value) is exc, f"raised {type(info.value).__name__}: {info.value}"


@pytest.mark.parametrize("impl", PROCESS_IMPLS)
@pytest.mark.parametrize("attr,value", [
    ("batch_size", 5), ("batch_sampler", None), ("sampler", None),
    ("drop_last", True), ("dataset", Indexed(3)), ("persistent_workers", False),
])
def test_attribute_frozen_after_init(impl, attr, value, loaders):
    loader = loaders.make(impl, Indexed(N), batch_size=2)
    with pytest.raises(ValueError):
        setattr(loader, attr, value)


@pytest.mark.parametrize("impl", PROCESS_IMPLS)
@pytest.mark.parametrize("kw", [
    dict(),
    dict(batch_size=4, shuffle=True, drop_last=True),
    dict(batch_size=None),
    dict(batch_size=3, num_workers=2),
    dict(batch_size=3, num_workers=2, prefetch_factor=5),
    dict(sampler=EveryOtherReversed(N), batch_size=2),
    dict(batch_sampler=_bs()),
], ids=["defaults", "shuffle-drop", "no-batching", "workers", "prefetch", "sampler", "batch_sampler"])
def test_public_attributes_match_torch(impl, kw, loaders):
    ref = torch.utils.data.DataLoader(Indexed(N), **kw)
    loader = loaders.make(impl, Indexed(N), **kw)
    for attr in ("batch_size", "drop_last", "num_workers", "prefetch_factor", "timeout",
                 "pin_memory", "worker_init_fn", "generator", "in_order"):
        assert getattr(loader, attr) == getattr(ref, attr), (
            f"{attr}: {getattr(loader, attr)!r} != torch's {getattr(ref, attr)!r}")
    assert type(loader.sampler) is type(ref.sampler)
    assert type(loader.batch_sampler) is type(ref.batch_sampler)
    if "sampler" in kw:
        assert loader.sampler is kw["sampler"]
    if "batch_sampler" in kw:
        assert loader.batch_sampler is kw["batch_sampler"]
    assert loader.collate_fn is ref.collate_fn
    assert len(loader) == len(ref)


@pytest.mark.parametrize("impl", PROCESS_IMPLS)
def test_valid_multiprocessing_context_object(impl, loaders):
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    loader = loaders.make(impl, Indexed(N), batch_size=4, num_workers=1, multiprocessing_context=ctx)
    assert [b.tolist() for b in loader] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_worker_type_bogus_names_argument_and_choices():
    nostall = nostall_module()
    with pytest.raises(ValueError) as info:
        nostall.DataLoader(Indexed(N), num_workers=2, worker_type="bogus")
    msg = str(info.value)
    for word in ("worker_type", "process", "thread", "bogus"):
        assert word in msg, f"message should mention {word!r}: {msg!r}"


@pytest.mark.parametrize("worker_type", ["process", "thread"])
def test_worker_type_valid_values_accepted(worker_type, loaders):
    impl = "nostall" if worker_type == "process" else "nostall-thread"
    loader = loaders.make(impl, Indexed(N), batch_size=5, num_workers=1)
    assert [b.tolist() for b in loader] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
