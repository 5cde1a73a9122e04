"""nostall's figures where users look: torch.profiler traces, TensorBoard event files
(``loader.stats.scalars()``), and Lightning loggers (``nostall.lightning.DataStallCallback``).

Everything real: torch.profiler, SummaryWriter files read back with TensorBoard's
EventAccumulator, Lightning ``Trainer.fit`` on CPU with a TensorBoardLogger.
"""

from __future__ import annotations

import json
import time
import warnings

import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

import nostall
from nostall.core._loader import PROFILE_NAME
from nostall.observe._stats import SCALAR_NAMES

DS = TensorDataset(torch.arange(128.0).view(64, 2), torch.arange(64))


class SlowSamples(Dataset):
    """Samples that take ``delay_s`` each: a loop with num_workers=0 waits for data."""

    def __init__(self, n: int = 64, delay_s: float = 0.002) -> None:
        self.n, self.delay_s = n, delay_s

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        time.sleep(self.delay_s)  # the cost of making a sample, not a synchronisation
        return torch.full((2,), float(i)), i


def _profiled_names(loader) -> list[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in loader:
            pass
    return [e.name for e in prof.events() if e.name.startswith("enumerate(DataLoader)#")]


# -- torch.profiler ----------------------------------------------------------------
@pytest.mark.timeout(120)
@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("stats", [True, False])
def test_profiler_names_each_next_like_torch(num_workers, stats):
    with nostall.DataLoader(DS, batch_size=8, num_workers=num_workers, stats=stats) as loader:
        names = _profiled_names(loader)
    torch_names = _profiled_names(torch.utils.data.DataLoader(DS, batch_size=8, num_workers=num_workers))
    # torch: one event per next(), the final StopIteration included (8 batches -> 9)
    assert len(torch_names) == 9 and len(set(torch_names)) == 1
    assert names == [PROFILE_NAME] * 9
    # what TensorBoard's profiler plugin counts as data loading
    assert PROFILE_NAME.startswith("enumerate(DataLoader)#") and PROFILE_NAME.endswith(".__next__")


@pytest.mark.timeout(120)
def test_export_trace_merges_onto_the_profiler_clock(tmp_path):
    with nostall.DataLoader(DS, batch_size=8, num_workers=2) as loader:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in loader:
                torch.ones(256, 256).sum()
        prof.export_chrome_trace(str(tmp_path / "torch.json"))
        out = loader.stats.export_trace(tmp_path / "both.json", profiler_trace=tmp_path / "torch.json")
    events = json.loads(out.read_text())["traceEvents"]
    nexts = sorted((e for e in events if e.get("name") == PROFILE_NAME), key=lambda e: e["ts"])
    waits = sorted((e for e in events if e.get("name") == "wait" and e.get("cat") == "loop"), key=lambda e: e["ts"])
    assert len(nexts) == 9 and len(waits) == 8  # the trace has one wait per batch (not the StopIteration)
    for outer, inner in zip(nexts, waits):  # nostall's wait sits inside the profiler's event
        assert outer["ts"] - 1000 <= inner["ts"] <= outer["ts"] + outer["dur"] + 1000
    assert any(e.get("name") == "process_name" and e["args"]["name"] == "nostall: worker 1" for e in events)
    with pytest.raises(ValueError, match="profiler_trace"):
        (tmp_path / "bad.json").write_text("[]")
        loader.stats.export_trace(tmp_path / "x.json", profiler_trace=tmp_path / "bad.json")


# -- scalars() and TensorBoard -----------------------------------------------------
@pytest.mark.timeout(120)
def test_scalars_names_and_window():
    with nostall.DataLoader(DS, batch_size=8, num_workers=2) as loader:
        for _ in loader:
            pass
        first = loader.stats.scalars()
        assert set(first) == {"nostall/" + n for n in SCALAR_NAMES if not n.startswith("device_")}
        assert all(isinstance(v, float) for v in first.values())
        assert first["nostall/num_workers"] == 2.0 and first["nostall/restarts"] == 0.0
        assert first["nostall/samples_per_s"] == pytest.approx(8 * first["nostall/batches_per_s"])
        assert 0 <= first["nostall/wait_fraction"] <= 1 and 0 <= first["nostall/workers_busy"] <= 1
        assert "nostall/wait_fraction" not in loader.stats.scalars()  # no batch since: left out
        it = iter(loader)
        next(it)
        next(it)
        assert set(loader.stats.scalars(prefix="")) >= {"wait_fraction", "batches_per_s", "samples_per_s"}


@pytest.mark.timeout(120)
def test_scalars_to_tensorboard_event_file(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    with nostall.DataLoader(DS, batch_size=8, num_workers=2) as loader:
        for epoch in range(3):
            for _ in loader:
                pass
            figures = loader.stats.scalars()
            for name, value in figures.items():
                writer.add_scalar(name, value, epoch)
            # add_scalars: one chart, one run directory per figure (``nostall_<name>``)
            writer.add_scalars("nostall", {k.split("/", 1)[1]: v for k, v in figures.items()}, epoch)
    writer.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"nostall/" + n for n in SCALAR_NAMES if not n.startswith("device_")} <= set(tags)
    assert [e.step for e in acc.Scalars("nostall/wait_fraction")] == [0, 1, 2]
    assert acc.Scalars("nostall/num_workers")[-1].value == 2.0
    grouped = EventAccumulator(str(tmp_path / "nostall_wait_fraction"))
    grouped.Reload()
    assert [e.value for e in grouped.Scalars("nostall")] == [e.value for e in acc.Scalars("nostall/wait_fraction")]


# -- Lightning -------------------------------------------------------------------
def _lightning():
    import torchvision_cpu

    torchvision_cpu.ensure()  # lightning imports torchmetrics, which imports torchvision
    return pytest.importorskip("lightning")


def _fit(loader, tmp_path, steps=12, every=4, warn_above=0.2):
    L = _lightning()
    from lightning.pytorch.loggers import TensorBoardLogger
    from nostall.lightning import DataStallCallback

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            x, _ = batch
            return self.layer(x).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    callback = DataStallCallback(every_n_steps=every, warn_above=warn_above)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=TensorBoardLogger(str(tmp_path)),
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[callback])
    trainer.fit(Tiny(), loader)
    return trainer, callback


def _read(trainer):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(trainer.logger.log_dir)
    acc.Reload()
    return acc


@pytest.mark.timeout(300)
def test_lightning_callback_on_nostall_loader(tmp_path):
    with nostall.DataLoader(DS, batch_size=4, num_workers=2) as loader:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer, callback = _fit(loader, tmp_path, warn_above=None)
    acc = _read(trainer)
    assert {"nostall/" + n for n in SCALAR_NAMES if not n.startswith("device_")} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("nostall/wait_fraction")] == [4, 8, 12]
    assert acc.Scalars("nostall/num_workers")[-1].value == 2.0
    assert not [w for w in caught if "waited for data" in str(w.message)]


@pytest.mark.timeout(300)
def test_lightning_callback_on_torch_loader_warns_once(tmp_path):
    loader = torch.utils.data.DataLoader(SlowSamples(), batch_size=4, num_workers=0)
    with pytest.warns(UserWarning, match="waited for data") as caught:
        trainer, callback = _fit(loader, tmp_path, steps=12, every=4, warn_above=0.2)
    assert len([w for w in caught if "waited for data" in str(w.message)]) == 1
    acc = _read(trainer)
    assert [t for t in acc.Tags()["scalars"] if t.startswith("nostall/")] == ["nostall/wait_fraction"]
    values = [e.value for e in acc.Scalars("nostall/wait_fraction")]
    assert len(values) == 3 and all(v > 0.5 for v in values)  # 8 ms a batch to make, a tiny step


@pytest.mark.timeout(300)
def test_lightning_num_workers_auto_no_worker_warning(tmp_path):
    _lightning()
    with nostall.DataLoader(DS, batch_size=4, num_workers="auto") as loader:
        from lightning.fabric.utilities.data import suggested_max_num_workers

        # Lightning's _worker_check warns when `loader.num_workers < 2` and it would suggest more
        assert isinstance(loader.num_workers, int)
        assert loader.num_workers >= 2 or suggested_max_num_workers(1) <= 1
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer, _ = _fit(loader, tmp_path, steps=8, warn_above=None)
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "num_workers" in m or "many workers" in m], messages
    assert trainer.global_step == 8
