"""Contract 2 (exactly once) and 1 (order) as hypothesis properties.

Over dataset size, batch size, drop_last, shuffle, in_order, num_workers and worker
type: every index the sampler yields is delivered exactly once per epoch (the
incomplete batch removed with drop_last); with in_order=True the batches equal
torch's exactly, with in_order=False the same batches arrive in some order.
Two epochs per example, so crossing an epoch boundary is part of every example.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import IMPLS, LoaderFactory, assert_same_epochs, flat_indices, reference_epochs
from toy_datasets import Indexed

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")

EPOCHS = 2

CONFIG = st.fixed_dictionaries({
    "n": st.integers(0, 200),
    "batch_size": st.integers(1, 17),
    "drop_last": st.booleans(),
    "shuffle": st.booleans(),
    "in_order": st.booleans(),
    "num_workers": st.sampled_from([0, 1, 2]),
    "seed": st.integers(0, 2**31 - 1),
})


@pytest.mark.timeout(300)
@pytest.mark.parametrize("impl", IMPLS)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(cfg=CONFIG)
def test_exactly_once_and_order(impl, cfg):
    n, seed = cfg["n"], cfg["seed"]
    kw = dict(batch_size=cfg["batch_size"], drop_last=cfg["drop_last"], shuffle=cfg["shuffle"])
    nw = cfg["num_workers"]
    if impl == "nostall-thread" and nw == 0:
        nw = 1  # thread vs process is meaningless without workers
    ds = Indexed(n)

    try:
        expected, expected_len = reference_epochs(ds, epochs=EPOCHS, seed=seed, **kw)
    except Exception as exc:  # e.g. shuffle=True on an empty dataset
        factory = LoaderFactory()
        try:
            with pytest.raises(type(exc)):
                loader = factory.make(impl, ds, num_workers=nw, in_order=cfg["in_order"],
                                      generator=torch.Generator().manual_seed(seed), **kw)
                run = [list(loader) for _ in range(EPOCHS)]  # noqa: F841
        finally:
            factory.close_all()
        return

    factory = LoaderFactory()
    try:
        loader = factory.make(impl, ds, num_workers=nw, in_order=cfg["in_order"],
                              generator=torch.Generator().manual_seed(seed), **kw)
        assert len(loader) == expected_len
        got = [list(loader) for _ in range(EPOCHS)]
    finally:
        factory.close_all()

    bs = cfg["batch_size"]
    for e in range(EPOCHS):
        idx = flat_indices(got[e])
        want = n - n % bs if cfg["drop_last"] else n
        assert len(idx) == want, f"epoch {e}: {len(idx)} samples delivered, expected {want}"
        assert len(set(idx)) == len(idx), f"epoch {e}: duplicates {sorted(i for i in set(idx) if idx.count(i) > 1)}"
        assert set(idx) <= set(range(n))
        assert sorted(idx) == sorted(flat_indices(expected[e])), f"epoch {e}: not the sampler's indices"
        if not cfg["in_order"]:  # same batches, any order
            assert sorted(tuple(b.tolist()) for b in got[e]) == sorted(tuple(b.tolist()) for b in expected[e])
    if cfg["in_order"]:
        assert_same_epochs(expected, got)
