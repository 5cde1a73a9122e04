"""nostall inside PyTorch Lightning's Trainer.fit and a Hugging Face accelerate loop.

Runs examples/lightning_fit.py and examples/accelerate_loop.py in subprocesses, as
one process and under torchrun with 2 ranks (gloo, CPU): 2 epochs, the statistics,
each rank's shard, the loader kept as it is, and (once ``DataLoader.state_dict``
exists) a run stopped mid-epoch and resumed from its checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_DIR, SRC_DIR, TESTS_DIR

import nostall

pytest.importorskip("lightning")
pytest.importorskip("accelerate")

EXAMPLES = Path(REPO_DIR) / "examples"
N, BATCH, WORLD = 512, 32, 2
BATCHES = N // BATCH  # per epoch, one process
STOP = 3  # batches of epoch 1 before the simulated crash
needs_resume = pytest.mark.skipif(not hasattr(nostall.DataLoader, "state_dict"),
                                  reason="resume: nostall.DataLoader.state_dict not implemented yet")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(script: str, *args, ranks: int = 1, timeout: float = 120) -> str:
    """Run an example (under torchrun when ranks > 1); return its stdout + stderr."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([SRC_DIR, TESTS_DIR, env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    cmd = [sys.executable]
    if ranks > 1:
        cmd += ["-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={ranks}",
                "--master_addr=127.0.0.1", f"--master_port={_free_port()}"]
    cmd += [str(EXAMPLES / script), *map(str, args)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO_DIR,
                          check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{out}"
    return out


def _recorded(directory: Path, ranks: int) -> list[dict]:
    return [json.loads((directory / f"rank{r}.json").read_text()) for r in range(ranks)]


def _complaints(out: str) -> list[str]:
    """Lightning's warnings about the loader (the 'few workers' hint depends on the machine)."""
    return [line for line in out.splitlines()
            if re.search(r"warn", line, re.IGNORECASE) and re.search(r"dataloader|sampler|worker|resum", line, re.IGNORECASE)
            and "does not have many workers" not in line]


def _assert_sharded(runs: list[dict], epochs=("0", "1")) -> None:
    for epoch in epochs:
        shards = [run[epoch] for run in runs]
        assert [len(s) for s in shards] == [N // len(runs)] * len(runs), f"epoch {epoch}"
        assert sorted(i for s in shards for i in s) == list(range(N)), f"epoch {epoch}: not the dataset"


# --------------------------------------------------------------------------- Lightning


@pytest.fixture(scope="module")
def lightning_single(tmp_path_factory):
    record = tmp_path_factory.mktemp("lightning")
    return _run("lightning_fit.py", "--record", record), record


@pytest.mark.timeout(180)
def test_lightning_fit_keeps_nostall_loader(lightning_single):
    out, record = lightning_single
    assert "rank 0: epoch 0 done, 512 samples" in out
    assert "rank 0: epoch 1 done, 512 samples" in out
    assert "lightning kept nostall's loader: True" in out
    assert f"overall: {2 * BATCHES} batches, {2 * N} samples" in out
    assert not _complaints(out), _complaints(out)
    (run,) = _recorded(record, 1)
    assert sorted(run["0"]) == list(range(N)) and run["0"] != run["1"]


@pytest.fixture(scope="module")
def lightning_ddp(tmp_path_factory):
    record = tmp_path_factory.mktemp("lightning-ddp")
    return _run("lightning_fit.py", "--record", record, ranks=WORLD), record


@pytest.mark.timeout(180)
def test_lightning_ddp_two_ranks_sharded(lightning_ddp):
    out, record = lightning_ddp
    _assert_sharded(_recorded(record, WORLD))
    if "sampler DistributedSampler" not in out:
        pytest.skip("nostall.DataLoader does not shard automatically yet: Lightning replaced it")
    assert out.count("lightning kept nostall's loader: True") == WORLD
    assert f"overall: {2 * BATCHES // WORLD} batches, {N} samples" in out
    assert not _complaints(out), _complaints(out)


@pytest.mark.timeout(240)
@needs_resume
@pytest.mark.parametrize("stop_at", [f"1:{STOP}", f"0:{BATCHES}"], ids=["mid-epoch", "end-of-epoch"])
def test_lightning_resume_from_checkpoint(lightning_single, stop_at, tmp_path):
    """Lightning saves loader.state_dict() in its checkpoint and restores it: the resumed
    run trains on exactly the batches the uninterrupted run had left."""
    _, full = lightning_single
    (expected,) = _recorded(full, 1)
    epoch, done = (int(v) for v in stop_at.split(":"))
    checkpoint = tmp_path / "stop.ckpt"
    _run("lightning_fit.py", "--stop-at", stop_at, "--checkpoint", checkpoint)
    out = _run("lightning_fit.py", "--resume", checkpoint, "--record", tmp_path)
    assert not _complaints(out), _complaints(out)
    (resumed,) = _recorded(tmp_path, 1)
    if done == BATCHES:  # saved at the end of the epoch: the next one is whole
        assert resumed == {"1": expected["1"]}
    else:
        assert resumed == {str(epoch): expected[str(epoch)][done * BATCH:]}


@pytest.mark.timeout(240)
@needs_resume
def test_lightning_ddp_resume_per_rank(lightning_ddp, tmp_path):
    """Lightning's checkpoint holds rank 0's loader state; every rank restores it and
    still continues its own shard."""
    out, full = lightning_ddp
    if "sampler DistributedSampler" not in out:
        pytest.skip("nostall.DataLoader does not shard automatically yet")
    _run("lightning_fit.py", "--stop-at", f"1:{STOP}", "--checkpoint", tmp_path / "stop.ckpt", ranks=WORLD)
    _run("lightning_fit.py", "--resume", tmp_path / "stop.ckpt", "--record", tmp_path, ranks=WORLD)
    for exp, got in zip(_recorded(full, WORLD), _recorded(tmp_path, WORLD)):
        assert got == {"1": exp["1"][STOP * BATCH:]}


_AUTO_FIT = """
import warnings, torch, lightning as L, nostall
warnings.simplefilter("always")

class Model(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(4, 1)

    def train_dataloader(self):
        ds = torch.utils.data.TensorDataset(torch.rand(256, 4), torch.rand(256, 1))
        self.loader = nostall.DataLoader(ds, batch_size=32, shuffle=True, num_workers="auto",
                                         prefetch_factor="auto")
        return self.loader

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

model = Model()
trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False)
trainer.fit(model)
loader = model.loader
print("result", type(loader.num_workers).__name__, loader.num_workers >= 1, loader.num_workers_setting,
      type(loader.prefetch_factor).__name__, loader.prefetch_factor_setting, loader.stats.batches)
"""


@pytest.mark.timeout(180)
def test_lightning_fit_with_auto_workers():
    """num_workers="auto" / prefetch_factor="auto" read as ints (the counts in use), so
    Lightning's worker check compares them: the fit runs with no error and no warning
    about the number of workers."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([SRC_DIR, os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _AUTO_FIT], env=env, capture_output=True, text=True,
                          timeout=170, cwd=REPO_DIR, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "result int True auto int auto 16" in out, out
    assert not re.search(r"num_workers|many workers|persistent_workers", out), out


def test_lightning_rebuild_from_attributes_keeps_auto():
    """Lightning rebuilds a loader made outside its hooks from the loader's attributes
    (e.g. to inject a DistributedSampler): "auto" survives, nostall's own arguments too."""
    import torch
    from lightning.pytorch.utilities.data import _update_dataloader

    ds = torch.utils.data.TensorDataset(torch.arange(20))
    loader = nostall.DataLoader(ds, batch_size=4, num_workers="auto", prefetch_factor="auto",
                                sync_dataset_attributes=True, max_worker_restarts=5)
    rebuilt = _update_dataloader(loader, torch.utils.data.SequentialSampler(ds))
    try:
        assert isinstance(rebuilt, nostall.DataLoader)
        assert (rebuilt.num_workers_setting, rebuilt.prefetch_factor_setting) == ("auto", "auto")
        assert rebuilt.sync_dataset_attributes is True and rebuilt.max_worker_restarts == 5
        assert [b[0].tolist() for b in rebuilt] == [list(range(i, i + 4)) for i in range(0, 20, 4)]
    finally:
        rebuilt.close()
        loader.close()


# --------------------------------------------------------------------------- accelerate


@pytest.mark.timeout(120)
def test_accelerate_prepare_rebuilds_the_loader_as_torch():
    """What accelerator.prepare(loader) does (why the example keeps the loader out of it)."""
    code = (
        "import torch, nostall\n"
        "from accelerate import Accelerator\n"
        "ds = torch.utils.data.TensorDataset(torch.arange(10))\n"
        "loader = nostall.DataLoader(ds, batch_size=2, num_workers=0)\n"
        "prepared = Accelerator(cpu=True).prepare(loader)\n"
        "print(type(prepared).__name__, type(prepared.base_dataloader).__module__,\n"
        "      isinstance(prepared.base_dataloader, nostall.DataLoader), sum(1 for _ in prepared),\n"
        "      loader.stats.batches)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([SRC_DIR, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=100,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    # A new torch DataLoader inside accelerate's DataLoaderShard; nostall's loader is never iterated.
    assert proc.stdout.split() == ["DataLoaderShard", "torch.utils.data.dataloader", "False", "5", "0"]


@pytest.mark.timeout(120)
def test_accelerate_loop_single_process(tmp_path):
    out = _run("accelerate_loop.py", "--record", tmp_path)
    assert "rank 0: epoch 0 done, 512 samples" in out and "rank 0: epoch 1 done, 512 samples" in out
    assert f"overall: {2 * BATCHES} batches, {2 * N} samples" in out
    (run,) = _recorded(tmp_path, 1)
    assert sorted(run["0"]) == list(range(N)) and run["0"] != run["1"]


@pytest.mark.timeout(240)
def test_accelerate_two_ranks_sharded_and_resumed(tmp_path):
    full, resumed, state = tmp_path / "full", tmp_path / "resumed", tmp_path / "state"
    for d in (full, resumed, state):
        d.mkdir()
    out = _run("accelerate_loop.py", "--record", full, ranks=WORLD)
    if "sampler DistributedSampler" not in out:
        pytest.skip("nostall.DataLoader does not shard automatically yet (each rank saw every sample)")
    expected = _recorded(full, WORLD)
    _assert_sharded(expected)
    assert f"overall: {2 * BATCHES // WORLD} batches, {N} samples" in out
    if not hasattr(nostall.DataLoader, "state_dict"):
        pytest.skip("resume: nostall.DataLoader.state_dict not implemented yet")
    _run("accelerate_loop.py", "--stop-at", f"1:{STOP}", "--state", state, ranks=WORLD)
    _run("accelerate_loop.py", "--resume", state, "--record", resumed, ranks=WORLD)
    for exp, got in zip(expected, _recorded(resumed, WORLD)):
        assert got == {"1": exp["1"][STOP * BATCH:]}
