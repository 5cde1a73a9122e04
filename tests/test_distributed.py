"""torch.distributed: one shard per rank (real torchrun, gloo), iterable sharding, CPU budget.

The torchrun cases run ``tests/dist_worker.py`` once on 2 ranks (module fixture);
each test reads what the ranks wrote.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.utils.data as tud
from conftest import SRC_DIR, TESTS_DIR
from toy_datasets import Indexed

import nostall
from nostall.core import _distributed
from nostall.observe import _cpus

N = 101  # odd: DistributedSampler pads one rank
WORLD = 2
EPOCHS = 2
BATCH = 4


# --------------------------------------------------------------------------- no process group


def test_no_process_group_keeps_torch_default():
    assert _distributed.rank_info() is None
    assert _distributed.shard_sampler(Indexed(N), shuffle=True) is None


def test_shard_sampler_with_two_ranks(monkeypatch):
    monkeypatch.setattr(_distributed, "rank_info", lambda: _distributed.RankInfo(1, 2, 2))
    s = _distributed.shard_sampler(Indexed(N), shuffle=True, drop_last=True)
    assert isinstance(s, tud.DistributedSampler)
    assert (s.rank, s.num_replicas, s.shuffle, s.drop_last, s.seed, len(s)) == (1, 2, True, True, 0, N // 2)
    g = torch.Generator().manual_seed(1234)
    state = g.get_state()
    assert _distributed.shard_sampler(Indexed(N), generator=g).seed == 1234
    assert torch.equal(g.get_state(), state), "the generator must not be drawn from"
    own = tud.SequentialSampler(Indexed(N))
    assert _distributed.shard_sampler(Indexed(N), sampler=own) is None
    assert _distributed.shard_sampler(Indexed(N), batch_sampler=tud.BatchSampler(own, 2, False)) is None
    assert _distributed.shard_sampler(_ShardedRange(N)) is None
    with pytest.raises(TypeError, match=r"`dataset` \(_NoLen\) has no len\(\).*2 ranks"):
        _distributed.shard_sampler(_NoLen())
    monkeypatch.setattr(_distributed, "rank_info", lambda: _distributed.RankInfo(0, 1, 1))
    assert _distributed.shard_sampler(Indexed(N), shuffle=True) is None  # one rank: torch's own sampler


class _NoLen(tud.Dataset):
    def __getitem__(self, i):
        return i


def test_iterable_shard_numbers_ranks_times_workers():
    seen = [_distributed.iterable_shard(r, 3, w, 2) for r in range(3) for w in range(2)]
    assert [s.index for s in seen] == list(range(6))
    assert {s.count for s in seen} == {6}
    with pytest.raises(ValueError, match="rank"):
        _distributed.iterable_shard(3, 3, 0, 2)
    with pytest.raises(ValueError, match="worker_id"):
        _distributed.iterable_shard(0, 3, 2, 2)


def test_shard_info_reads_torchrun_environment_and_warns_once(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(_distributed, "_empty_warned", False)
    assert nostall.shard_info(length=10) == (1, 2)
    with pytest.warns(UserWarning, match=r"shard 1 of 2 \(rank 1 of 2, worker 0 of 1\) is empty"):
        nostall.shard_info(length=1)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nostall.shard_info(length=1)  # once per process


def test_shard_info_in_workers_yields_each_sample_once(loaders):
    class_ = _ShardedRange
    for impl in ("nostall", "nostall-thread"):
        loader = loaders.make(impl, class_(23), batch_size=4, num_workers=2)
        got = [i for batch in loader for i in batch.tolist()]
        assert sorted(got) == list(range(23)), impl


class _ShardedRange(tud.IterableDataset):
    def __init__(self, n):
        self.n = n

    def __iter__(self):
        index, count = nostall.shard_info(length=self.n)
        return iter(range(index, self.n, count))


def test_advance_epoch_sets_loader_epoch_unless_set_epoch_was_called():
    sampler = tud.DistributedSampler(range(10), num_replicas=2, rank=0)
    last = _distributed.advance_epoch(sampler, 0, last=0)  # first iter(), a new sampler
    assert (last, sampler.epoch) == (0, 0)
    last = _distributed.advance_epoch(sampler, 1, last)
    assert (last, sampler.epoch) == (1, 1)
    sampler.set_epoch(7)  # the user's (or Lightning's) value wins
    last = _distributed.advance_epoch(sampler, 2, last)
    assert (last, sampler.epoch) == (7, 7)
    sampler.set_epoch(8)
    last = _distributed.advance_epoch(sampler, 3, last)
    assert (last, sampler.epoch) == (8, 8)
    assert _distributed.advance_epoch(sampler, 4) == 4 and sampler.epoch == 4  # last=None: always set
    assert _distributed.advance_epoch(tud.SequentialSampler(range(3)), 1, 0) is None


def test_local_cpu_budget_divides_among_local_ranks(monkeypatch):
    cpus = _cpus.usable_cpus().count
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert _cpus.local_cpu_budget() == cpus
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert _cpus.local_cpu_budget() == cpus / 4


# --------------------------------------------------------------------------- torchrun


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What each of the 2 ranks of one real torchrun run got (see dist_worker.py)."""
    out = tmp_path_factory.mktemp("torchrun")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([SRC_DIR, TESTS_DIR, env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # one machine: gloo needs no other interface
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={WORLD}",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
        os.path.join(TESTS_DIR, "dist_worker.py"),
        "--out", str(out), "--samples", str(N), "--batch", str(BATCH), "--epochs", str(EPOCHS),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=150, check=False)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]
    return results, proc.stderr


def _indices(batches) -> list:
    return [i for batch in batches for i in batch]


def _require_auto_sharding(results) -> None:
    if results[0]["sampler"] != "DistributedSampler":
        pytest.skip("nostall.DataLoader does not shard automatically yet (shard_sampler is not "
                    f"wired into _loader.py); its sampler was {results[0]['sampler']}")


@pytest.mark.timeout(180)
def test_each_rank_gets_its_padded_shard(ranks):
    results, _ = ranks
    assert [r["rank"] for r in results] == list(range(WORLD))
    assert {r["world_size"] for r in results} == {WORLD}
    assert {r["local_world_size"] for r in results} == {WORLD}
    _require_auto_sharding(results)
    per_rank = math.ceil(N / WORLD)
    for r in results:
        assert r["len"] == math.ceil(per_rank / BATCH)
        assert r["stats_batches"] == EPOCHS * r["len"]
    for epoch in range(EPOCHS):
        got = [_indices(r["nostall"][epoch]) for r in results]
        assert [len(g) for g in got] == [per_rank] * WORLD, f"epoch {epoch}"
        union = [i for g in got for i in g]
        assert sorted(set(union)) == list(range(N)), f"epoch {epoch}: union is not the dataset"
        # DistributedSampler pads with repeats only: N odd -> exactly one sample twice.
        assert len(union) - len(set(union)) == WORLD * per_rank - N
        assert all(len(set(g)) == len(g) for g in got), f"epoch {epoch}: a rank got a sample twice"


@pytest.mark.timeout(180)
def test_shuffled_by_epoch_and_equal_to_torch_with_distributed_sampler(ranks):
    results, _ = ranks
    _require_auto_sharding(results)
    for r in results:
        assert r["nostall"][0] != r["nostall"][1], f"rank {r['rank']}: both epochs in the same order"
        assert r["nostall"] == r["torch"], f"rank {r['rank']}: batches differ from torch + DistributedSampler"


@pytest.mark.timeout(180)
def test_users_distributed_sampler_is_kept(ranks):
    results, _ = ranks
    for r in results:
        assert r["nostall_explicit_kept"]
        assert r["nostall_explicit"] == r["torch"]


@pytest.mark.timeout(180)
def test_iterable_dataset_once_over_ranks_and_workers(ranks):
    results, stderr = ranks
    for epoch in range(EPOCHS):
        union = [i for r in results for i in _indices(r["iterable"][epoch])]
        assert sorted(union) == list(range(N)), f"epoch {epoch}: not every sample exactly once"
    small = [i for r in results for i in _indices(r["iterable_small"][0])]
    assert sorted(small) == [0, 1, 2]
    # 3 samples over 2 ranks x 2 workers: shard 3 (rank 1, worker 1) is empty.
    assert "shard 3 of 4 (rank 1 of 2, worker 1 of 2) is empty" in stderr


@pytest.mark.timeout(180)
def test_cpu_budget_is_shared_by_local_ranks(ranks):
    results, _ = ranks
    for r in results:
        assert r["cpu_budget"] == pytest.approx(r["usable_cpus"] / WORLD)


@pytest.mark.timeout(180)
@pytest.mark.skipif(not hasattr(nostall.DataLoader, "state_dict"),
                    reason="resume: nostall.DataLoader.state_dict / load_state_dict not implemented yet")
def test_resume_mid_epoch_per_rank(ranks):
    """Each rank saves its state after RESUME_AT batches of epoch 1 and a new loader
    finishes that epoch: together they equal the uninterrupted epoch 1. A state
    saved between epochs 0 and 1 continues with epoch 1."""
    results, _ = ranks
    _require_auto_sharding(results)
    for r in results:
        resume = r["resume"]
        assert len(resume["head"]) == resume["at"]
        assert resume["head"] + resume["tail"] == r["nostall"][1], f"rank {r['rank']}: mid-epoch"
        # Saved between epochs 0 and 1: the new loader's first epoch is epoch 1 (set_epoch(1)).
        assert resume["next_epoch"] == r["nostall"][1], f"rank {r['rank']}: between epochs"
