"""worker_type="ray": batches made by Ray actors, on a real multi-node Ray cluster.

One cluster for the module (``ray.cluster_utils.Cluster``, every node a real raylet
with its own object store): a head with no CPUs, so no actor runs beside the
driver, and two nodes with one CPU and one ``nw`` each. Tests that remove a node
add their own first, so the two stay for the tests after them. Batches are
compared with torch's DataLoader (deterministic datasets) and with nostall's local
process workers (datasets drawing random numbers: nostall's per-batch seeding).
"""

from __future__ import annotations

import gc
import json
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
import warnings

import psutil
import pytest

ray = pytest.importorskip("ray", reason="worker_type='ray' needs Ray: pip install 'nostall[ray]'")

import torch  # noqa: E402
from conftest import assert_same_epochs, run_epochs  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402
from toy_datasets import HangsOnce, Indexed, RandomValues, Raises, ShardedIterable, Sleepy, WorkerInfoMap  # noqa: E402

import nostall  # noqa: E402

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
SRC_DIR = os.path.join(os.path.dirname(TESTS_DIR), "src")
STORE = 100 * 2**20  # each node's object store: small, batches here are tiny

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:.*nostall started a new worker in its place.*:RuntimeWarning")]


@pytest.fixture(scope="module")
def cluster():
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": STORE})
    for _ in range(2):
        cluster.add_node(num_cpus=1, resources={"nw": 1}, object_store_memory=STORE)
    # Actors import nostall and the test datasets from this checkout, as the driver does.
    ray.init(address=cluster.address, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([SRC_DIR, TESTS_DIR])}})
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def _loader(dataset, workers, seed=5, worker_type="ray", shuffle=True, **kw):
    return nostall.DataLoader(dataset, batch_size=3, shuffle=shuffle, num_workers=workers, worker_type=worker_type,
                              generator=torch.Generator().manual_seed(seed), **kw)


def _torch(dataset, epochs, seed=5):
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    return run_epochs(loader, epochs)


def _node_of(cluster, node_id: str):
    for node in cluster.list_all_nodes():
        if node.node_id == node_id:
            return node
    raise AssertionError(f"no node {node_id}")


# --------------------------------------------------------------------------- same batches


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers", [1, 2])
def test_same_batches_in_the_same_order_as_torch_over_two_shuffled_epochs(cluster, workers):
    dataset = Indexed(40)
    with _loader(dataset, workers) as loader:
        got = run_epochs(loader, 2)
        assert len(loader._engine.pool.wait_started()) == workers
    assert_same_epochs(_torch(dataset, 2), got)


@pytest.mark.timeout(60)
def test_random_batches_equal_nostalls_local_process_workers(cluster):
    dataset = RandomValues(30)
    with _loader(dataset, 2, worker_type="process") as local:
        expected = run_epochs(local, 2)
    with _loader(dataset, 2) as remote:
        got = run_epochs(remote, 2)
    assert_same_epochs(expected, got)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("uneven", [False, True])
def test_an_iterable_dataset_sharded_by_worker_info_gives_the_batches_of_local_workers(cluster, uneven):
    dataset = ShardedIterable(23, uneven=uneven)
    kw = dict(batch_size=3, num_workers=2)
    with nostall.DataLoader(dataset, **kw) as local:
        expected = run_epochs(local, 2)
    with nostall.DataLoader(dataset, worker_type="ray", **kw) as remote:
        got = run_epochs(remote, 2)
    assert_same_epochs(expected, got)


class Big(torch.utils.data.Dataset):
    """Samples of 256 KB: a batch of 3 is 768 KB, kept in Ray's object store (not inlined)."""

    def __len__(self):
        return 30

    def __getitem__(self, i):
        return torch.full((256, 1024), i, dtype=torch.uint8)


@pytest.mark.timeout(60)
def test_batches_are_writable_tensors_and_their_object_references_are_released_when_taken(cluster):
    core_worker = ray._private.worker.global_worker.core_worker
    gc.collect()
    before = set(core_worker.get_all_reference_counts())  # earlier tests' (Ray frees them in its own time)
    with _loader(Big(), 2, prefetch_factor=2) as loader:
        held = list(loader)  # every batch kept by the loop: none may pin Ray's object store
        window = loader._engine.config.window
        references = len(set(core_worker.get_all_reference_counts()) - before)
    assert [int(b[0, 0, 0]) for b in held] == [int(b[0, 0, 0]) for b in _torch(Big(), 1)[0]]
    held[0].add_(1)  # the loop owns its batches: no read-only view of the object store
    assert references <= window + 1  # the batches in flight (made for the next epoch) and the dataset


@pytest.mark.timeout(60)
def test_get_worker_info_inside_the_actors(cluster):
    dataset = WorkerInfoMap(12)
    with _loader(dataset, 2) as loader:
        batches = list(loader)
    assert sorted(i for b in batches for i in b["i"].tolist()) == list(range(12))
    assert {i for b in batches for i in b["id"].tolist()} <= {0, 1}
    assert all(b["num_workers"].tolist() == [2] * len(b["i"]) for b in batches)
    assert all(all(b["dataset_ok"]) for b in batches)
    assert len({s for b in batches for s in b["seed"].tolist()}) >= 1


@pytest.mark.timeout(90)
def test_mid_epoch_state_dict_resume_equals_the_uninterrupted_run(cluster):
    dataset = RandomValues(45)
    with _loader(dataset, 2) as loader:
        expected = run_epochs(loader, 2)
    first = _loader(dataset, 2)
    it = iter(first)
    got = [[next(it) for _ in range(4)]]
    state = pickle.loads(pickle.dumps(first.state_dict()))
    first.close()
    with _loader(dataset, 2) as second:
        second.load_state_dict(state)
        got[0] += list(second)
        got.append(list(second))
    assert_same_epochs(expected, got)


@pytest.mark.timeout(60)
def test_num_workers_auto_uses_at_most_the_actors_the_cluster_has_room_for(cluster):
    dataset = Indexed(60)
    with _loader(dataset, "auto") as loader:
        got = run_epochs(loader, 2)
        assert 1 <= loader.num_workers <= 2  # two nodes with one CPU each
        assert loader.num_workers_setting == "auto"
    assert_same_epochs(_torch(dataset, 2), got)


@pytest.mark.timeout(150)
def test_each_torch_distributed_rank_gets_its_own_actors_and_its_shard(cluster, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo",
               PYTHONPATH=os.pathsep.join([SRC_DIR, TESTS_DIR, os.environ.get("PYTHONPATH", "")]))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={port}", os.path.join(TESTS_DIR, "ray_dist_worker.py"),
           "--out", str(tmp_path), "--address", cluster.address]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=140, check=False)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-3000:]}"
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in ranks:
        assert r["nostall"] == r["torch"], f"rank {r['rank']}: batches differ from torch + DistributedSampler"
        assert len(r["actor_pids"]) == 1
    assert ranks[0]["actor_pids"] != ranks[1]["actor_pids"]  # each rank its own actor
    seen = sorted(i for r in ranks for b in r["nostall"][0] for i in b)
    assert set(seen) == set(range(41)) and len(seen) == 42  # DistributedSampler pads 41 to 2 x 21


# --------------------------------------------------------------------------- deaths


def _wait_dead(actor, timeout: float = 30.0) -> None:
    """Return once Ray reports ``actor`` dead (a call to it fails)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            ray.get(actor.__ray_ready__.remote(), timeout=max(0.1, deadline - time.monotonic()))
        except ray.exceptions.RayActorError:
            return
    raise AssertionError(f"actor {actor} still alive after {timeout} s")


def _run_killing(dataset, kill, workers=2, at=4):
    """Two epochs; ``kill(pool)`` runs after batch ``at`` of the first was delivered."""
    with _loader(dataset, workers) as loader:
        got = [[]]
        for batch in loader:
            got[0].append(batch)
            if len(got[0]) == at:
                kill(loader._engine.pool)
        got.append(list(loader))
        restarts = list(loader._engine.supervisor.restarts)  # the causes, for a failure's message
    return got, restarts


@pytest.mark.timeout(90)
@pytest.mark.parametrize("how", ["ray.kill", "SIGKILL"])
def test_an_actor_killed_mid_epoch_is_replaced_and_every_batch_arrives_once(cluster, how):
    dataset = Sleepy(60, 0.004)  # both actors busy: the scheduler gives the killed one work again

    def kill(pool):
        pool.wait_started()
        actor = pool.actor(0)
        if how == "ray.kill":
            ray.kill(actor)
        else:
            process = psutil.Process(pool.pids[0])  # the actor's process, on this machine
            process.kill()
            process.wait(10)
        _wait_dead(actor)  # ray.kill only asks: the epoch's instant batches could all be made first

    got, restarts = _run_killing(dataset, kill)
    assert_same_epochs(_torch(dataset, 2), got)
    assert len(restarts) == 1, restarts


@pytest.mark.timeout(90)
def test_a_node_removed_mid_epoch_loses_its_actor_and_every_batch_arrives_once(cluster):
    cluster.add_node(num_cpus=1, resources={"nw": 1}, object_store_memory=STORE)  # room for the new actor
    cluster.wait_for_nodes()
    dataset = Sleepy(60, 0.004)  # both actors busy: the scheduler gives the killed one work again
    removed = []

    def kill(pool):
        pool.wait_started()
        node = _node_of(cluster, pool.node_ids[0])
        removed.append(node)
        cluster.remove_node(node)

    got, restarts = _run_killing(dataset, kill)
    assert_same_epochs(_torch(dataset, 2), got)
    assert len(restarts) == 1, restarts
    assert len(removed) == 1
    alive = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("nw")]
    assert len(alive) == 2  # with the spare: the next tests have two nodes with one CPU and one `nw`


@pytest.mark.timeout(90)
def test_a_hung_batch_ends_its_actor_and_is_made_again_in_a_new_one(cluster, tmp_path):
    dataset = HangsOnce(30, bad=13, flag=str(tmp_path / "hung"))  # the actors share this machine's files
    with _loader(dataset, 2, hang_timeout=2) as loader:
        with pytest.warns(RuntimeWarning, match=r"nostall worker \d \(pid \d+\) has been making batch \d+ of epoch 0"):
            got = run_epochs(loader, 1)
        assert loader._engine.supervisor.restart_count == 1
    assert_same_epochs(_torch(dataset, 1), got)


# --------------------------------------------------------------------------- errors


@pytest.mark.timeout(60)
def test_an_unpicklable_dataset_is_named_before_any_actor_starts(cluster):
    dataset = Indexed(10)
    dataset.lock = threading.Lock()
    loader = _loader(dataset, 1)
    with pytest.raises(TypeError, match=r"`dataset\.lock` \(lock: .*\) cannot be pickled") as info:
        iter(loader)
    assert "fork does not cross machines" in str(info.value)
    loader.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers, options, room", [(1, {"resources": {"nw": 5}}, 0), (3, {"resources": {"nw": 1}}, 2),
                                                    (1, {"num_cpus": 4}, 0)])
def test_actors_that_cannot_be_placed_raise_at_once(cluster, workers, options, room):
    loader = _loader(Indexed(10), workers, ray_actor_options=options)
    with pytest.raises(RuntimeError, match=f"has room for {room} such actor"):
        iter(loader)
    loader.close()


@pytest.mark.timeout(60)
def test_an_exception_in_a_remote_getitem_keeps_its_type_traceback_indices_and_node(cluster):
    with _loader(Raises(12, bad={7}), 2, seed=0, shuffle=False) as loader:
        with pytest.raises(ValueError) as info:
            list(loader)
    text = str(info.value)
    assert "Caught ValueError in DataLoader worker process" in text
    assert "Original Traceback" in text and "sample 7 is corrupt" in text and "raise ValueError" in text
    assert "sample index 7" in text
    assert "on Ray node " in text and "node id" in text


@pytest.mark.timeout(60)
def test_a_dataset_module_the_nodes_lack_is_named_before_the_first_batch(cluster, tmp_path, monkeypatch):
    (tmp_path / "only_here.py").write_text("import torch\n\nclass Local(torch.utils.data.Dataset):\n"
                                           "    def __len__(self):\n        return 4\n\n"
                                           "    def __getitem__(self, i):\n        return i\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # this process imports it; the actors cannot
    from only_here import Local

    with _loader(Local(), 1) as loader:
        with pytest.raises(ModuleNotFoundError, match=r"(?s)No module named 'only_here'.*while reading the dataset"
                                                      r".*is every module they need installed on that node"):
            next(iter(loader))


def collate_with_a_lock(samples):
    """A batch Ray cannot serialize (it holds a lock)."""
    return {"i": torch.tensor(samples), "lock": threading.Lock()}


@pytest.mark.timeout(60)
def test_a_batch_ray_cannot_serialize_is_raised_as_that_batchs_error(cluster):
    with _loader(Indexed(12), 1, shuffle=False, collate_fn=collate_with_a_lock) as loader:
        with pytest.raises(TypeError, match=r"(?s)cannot pickle '_thread.lock'.*while sending batch 0 of epoch 0 "
                                            r"\(Ray could not serialize it"):
            next(iter(loader))


@pytest.mark.timeout(90)
def test_the_nodes_going_away_is_a_clear_error(cluster):
    cluster.add_node(num_cpus=1, resources={"doomed": 1}, object_store_memory=STORE)
    cluster.wait_for_nodes()
    with _loader(Indexed(60), 1, ray_actor_options={"resources": {"doomed": 1}}) as loader:
        it = iter(loader)
        next(it)
        pool = loader._engine.pool
        pool.wait_started()
        cluster.remove_node(_node_of(cluster, pool.node_ids[0]))
        with pytest.raises(RuntimeError, match=r"cannot replace Ray actor 0.*has room for 0 such actor"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                list(it)


@pytest.mark.timeout(30)
def test_ray_actor_options_are_checked_when_the_loader_is_built():
    with pytest.raises(ValueError, match=r"`ray_actor_options` must be None or a dict.*got \{'max_restarts': 2\}"):
        nostall.DataLoader(Indexed(4), num_workers=1, worker_type="ray", ray_actor_options={"max_restarts": 2})
    with pytest.raises(ValueError, match=r"worker_type='ray'.*num_workers=0"):
        nostall.DataLoader(Indexed(4), num_workers=0, worker_type="ray")


@pytest.fixture(autouse=True)
def _reap_stray_workers():
    """Replaces conftest's: the processes a test starts here are the Ray cluster's (nodes
    added by a test, the raylets' idle workers), which Ray ends itself; nostall's actors
    are ended by ``ray.kill`` when their loader closes."""
    yield
