"""Section 2 of the drop-in promise: the same API surface and the same errors as torch.

Every invalid argument combination torch's DataLoader refuses (in ``__init__``, in
the samplers it builds, or when an iterator is made) is built with torch's loader
and with nostall's; nostall must raise the same exception type, at the same moment
(construction or ``iter()``), with a message that starts with torch's (nostall may
append its explanation).
"""

from __future__ import annotations

import typing

import numpy as np
import pytest
import torch
from torch.utils.data import BatchSampler, Dataset, SequentialSampler

from conftest import assert_same, nostall_module
from toy_datasets import EveryOtherReversed, Indexed, SimpleIterable

N = 10


class NoLen(Dataset):
    """A map-style dataset without ``__len__`` (RandomSampler needs one)."""

    def __getitem__(self, i):
        return i


def _bs():
    return BatchSampler(SequentialSampler(range(N)), batch_size=3, drop_last=False)


def _ds():
    return Indexed(N)


# (id, dataset factory, kwargs factory). Everything torch validates, in the order its code does.
INVALID = [
    # DataLoader.__init__
    ("num_workers negative", _ds, lambda: dict(num_workers=-1)),
    ("num_workers str", _ds, lambda: dict(num_workers="2")),
    ("num_workers None", _ds, lambda: dict(num_workers=None)),
    ("num_workers and timeout negative", _ds, lambda: dict(num_workers=-1, timeout=-1)),
    ("timeout negative", _ds, lambda: dict(timeout=-1)),
    ("timeout negative with workers", _ds, lambda: dict(num_workers=2, timeout=-1)),
    ("timeout str", _ds, lambda: dict(timeout="1")),
    ("prefetch_factor without workers", _ds, lambda: dict(prefetch_factor=2)),
    ("prefetch_factor auto without workers", _ds, lambda: dict(prefetch_factor="auto")),
    ("prefetch_factor negative", _ds, lambda: dict(num_workers=2, prefetch_factor=-1)),
    ("prefetch_factor str", _ds, lambda: dict(num_workers=2, prefetch_factor="2")),
    ("persistent_workers without workers", _ds, lambda: dict(persistent_workers=True)),
    ("iterable+shuffle", lambda: SimpleIterable(N), lambda: dict(shuffle=True)),
    ("iterable+sampler", lambda: SimpleIterable(N), lambda: dict(sampler=EveryOtherReversed(N))),
    ("iterable+batch_sampler", lambda: SimpleIterable(N), lambda: dict(batch_sampler=_bs())),
    ("sampler+shuffle", _ds, lambda: dict(sampler=EveryOtherReversed(N), shuffle=True)),
    ("batch_sampler+batch_size", _ds, lambda: dict(batch_sampler=_bs(), batch_size=2)),
    ("batch_sampler+shuffle", _ds, lambda: dict(batch_sampler=_bs(), shuffle=True)),
    ("batch_sampler+sampler", _ds, lambda: dict(batch_sampler=_bs(), sampler=EveryOtherReversed(N))),
    ("batch_sampler+drop_last", _ds, lambda: dict(batch_sampler=_bs(), drop_last=True)),
    ("batch_size=None+drop_last", _ds, lambda: dict(batch_size=None, drop_last=True)),
    ("multiprocessing_context bogus", _ds, lambda: dict(num_workers=2, multiprocessing_context="bogus")),
    ("multiprocessing_context not a context", _ds, lambda: dict(num_workers=2, multiprocessing_context=123)),
    ("multiprocessing_context without workers", _ds, lambda: dict(multiprocessing_context="fork")),
    # BatchSampler.__init__
    ("batch_size 0", _ds, lambda: dict(batch_size=0)),
    ("batch_size negative", _ds, lambda: dict(batch_size=-3)),
    ("batch_size float", _ds, lambda: dict(batch_size=2.5)),
    ("batch_size bool", _ds, lambda: dict(batch_size=True)),
    ("batch_size str", _ds, lambda: dict(batch_size="2")),
    ("batch_size numpy int", _ds, lambda: dict(batch_size=np.int64(2))),
    ("drop_last not bool", _ds, lambda: dict(drop_last="yes")),
    # RandomSampler.__init__
    ("shuffle empty dataset", lambda: Indexed(0), lambda: dict(shuffle=True)),
    ("shuffle dataset without len", NoLen, lambda: dict(shuffle=True)),
    # iter(): _BaseDataLoaderIter, _SingleProcessDataLoaderIter, _MultiProcessingDataLoaderIter
    ("timeout without workers", _ds, lambda: dict(timeout=5)),
    ("generator int", _ds, lambda: dict(generator=42)),
    ("generator int with shuffle", _ds, lambda: dict(generator=42, shuffle=True)),
    ("generator numpy", _ds, lambda: dict(generator=np.random.default_rng(0), shuffle=True)),
    ("generator int with workers", _ds, lambda: dict(generator=42, num_workers=2)),
    ("prefetch_factor 0", _ds, lambda: dict(num_workers=2, prefetch_factor=0)),
    ("num_workers float", _ds, lambda: dict(num_workers=2.0)),
    ("prefetch_factor float", _ds, lambda: dict(num_workers=2, prefetch_factor=2.5)),
    ("sampler not iterable", _ds, lambda: dict(sampler=5, batch_size=None)),
    ("sampler not iterable, batched", _ds, lambda: dict(sampler=5, batch_size=2)),
    ("batch_sampler not iterable", _ds, lambda: dict(batch_sampler=5)),
]


def _outcome(cls, make_ds, kw):
    """(stage, exception) of building ``cls`` and taking one batch: stage is "init" or "iter"."""
    try:
        loader = cls(make_ds(), **kw)
    except Exception as exc:  # noqa: BLE001 - comparing whatever torch raises
        return "init", exc
    try:
        next(iter(loader))
    except Exception as exc:  # noqa: BLE001
        return "iter", exc
    finally:
        close = getattr(loader, "close", None)
        if close is not None:
            close()
        it = getattr(loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
    return "ok", None


@pytest.mark.timeout(60)
@pytest.mark.parametrize("make_ds,make_kw", [pytest.param(*c[1:], id=c[0]) for c in INVALID])
def test_invalid_arguments_raise_torchs_error(make_ds, make_kw):
    nostall = nostall_module()
    kw = make_kw()
    if kw.get("num_workers", 0) != 0 and "multiprocessing_context" not in kw:
        kw["multiprocessing_context"] = "fork"
    torch_stage, torch_exc = _outcome(torch.utils.data.DataLoader, make_ds, dict(kw))
    assert torch_exc is not None, "torch accepts this case: it does not belong in INVALID"
    stage, exc = _outcome(nostall.DataLoader, make_ds, dict(kw))
    assert exc is not None, f"nostall accepted what torch refuses with {torch_exc!r}"
    assert type(exc) is type(torch_exc), f"nostall raised {type(exc).__name__}: {exc}\ntorch: {torch_exc!r}"
    assert str(exc).startswith(str(torch_exc)), f"nostall: {exc}\ntorch:   {torch_exc}"
    assert stage == torch_stage, f"torch raises at {torch_stage}, nostall at {stage}"


# Values torch accepts although they are unusual: nostall must accept them too, with torch's batches.
ACCEPTED = [
    ("num_workers bool", lambda: dict(num_workers=True, batch_size=3)),
    ("num_workers numpy int", lambda: dict(num_workers=np.int64(2), batch_size=3)),
    ("prefetch_factor numpy int", lambda: dict(num_workers=1, prefetch_factor=np.int64(3), batch_size=3)),
    ("timeout numpy float", lambda: dict(timeout=np.float64(0.0), batch_size=3)),
    ("persistent_workers int", lambda: dict(num_workers=1, persistent_workers=1, batch_size=3)),
    ("shuffle numpy bool", lambda: dict(shuffle=np.bool_(False), batch_size=3)),
    ("generator subclass", lambda: dict(shuffle=True, generator=_SeededGenerator(), batch_size=3)),
]


class _SeededGenerator(torch.Generator):
    """A torch.Generator subclass (torch accepts any)."""

    def __init__(self):
        super().__init__()
        self.manual_seed(7)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("make_kw", [pytest.param(c[1], id=c[0]) for c in ACCEPTED])
def test_unusual_values_torch_accepts_are_accepted(make_kw, loaders):
    expected = list(loaders.make("torch", Indexed(N), **make_kw()))
    got = list(loaders.make("nostall", Indexed(N), **make_kw()))
    assert_same(expected, got)


def test_dataloader_is_generic_like_torchs():
    nostall = nostall_module()

    def make() -> nostall.DataLoader[list[torch.Tensor]]:
        return nostall.DataLoader(Indexed(3))

    hints = typing.get_type_hints(make, localns={"nostall": nostall})
    assert hints["return"] == nostall.DataLoader[list[torch.Tensor]]
    assert typing.get_origin(hints["return"]) is nostall.DataLoader
    assert typing.get_args(nostall.DataLoader[int]) == (int,)
    loader = nostall.DataLoader[int](Indexed(3))  # a subscripted class still builds loaders
    assert isinstance(loader, nostall.DataLoader) and list(loader) == [torch.tensor([i]) for i in range(3)]
    assert len(nostall.DataLoader.__parameters__) == len(torch.utils.data.DataLoader.__parameters__) == 1


def test_signature_keeps_torchs_arguments_in_torchs_order():
    import inspect

    nostall = nostall_module()
    ours = list(inspect.signature(nostall.DataLoader.__init__).parameters.values())
    theirs = list(inspect.signature(torch.utils.data.DataLoader.__init__).parameters.values())
    for mine, torchs in zip(ours, theirs):
        assert (mine.name, mine.kind) == (torchs.name, torchs.kind)
