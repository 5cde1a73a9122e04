"""loader.stats, nostall.watch, nostall.progress: counts, timings, trace, log line."""

from __future__ import annotations

import io
import json
import logging
import time

import pytest
import torch
from toy_datasets import Indexed, Sleepy

import nostall

pytestmark = pytest.mark.timeout(60)


def _busy(seconds: float) -> None:
    """A training step of known length that does not sleep (it keeps the CPU, as training does)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


@pytest.mark.parametrize("worker_type", ["process", "thread"])
def test_counts_epochs_workers_and_memory(worker_type):
    with nostall.DataLoader(Indexed(100), batch_size=8, num_workers=2, worker_type=worker_type) as loader:
        for _ in range(3):
            for _batch in loader:
                pass
        stats = loader.stats
        assert [e.batches for e in stats.epochs] == [13, 13, 13]
        assert [e.samples for e in stats.epochs] == [100, 100, 100]
        assert all(e.complete for e in stats.epochs)
        assert stats.batches == 39 and stats.samples == 300
        assert len(stats.pauses_s) == 2 and stats.time_to_first_batch_s > 0
        assert 0.0 <= stats.waiting_fraction <= 1.0
        busy = stats.worker_busy
        assert len(busy) == 2 and all(0.0 < b <= 1.0 for b in busy)
        assert 1 <= stats.in_flight["max"] <= stats.in_flight["window"] == 4
        assert stats.peak_memory_mb > 10
        text = str(stats)
        assert "epoch 2: 13 batches" in text and "workers busy" in text and "peak memory" in text
        json.dumps(stats.to_dict())  # plain data


def test_inline_loader_and_abandoned_epoch():
    loader = nostall.DataLoader(Indexed(50), batch_size=10)
    for i, _batch in enumerate(loader):
        if i == 1:
            break
    list(loader)
    stats = loader.stats
    assert [(e.batches, e.complete) for e in stats.epochs] == [(2, False), (5, True)]
    assert stats.worker_busy is None and stats.in_flight is None
    loader.close()


def test_stats_off():
    loader = nostall.DataLoader(Indexed(20), batch_size=4, stats=False)
    assert loader.stats is None
    assert [b.tolist() for b in loader] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11],
                                            [12, 13, 14, 15], [16, 17, 18, 19]]
    assert len(iter(loader)) == 5


def test_waiting_fraction_matches_a_run_where_data_is_free():
    """The acceptance check: watch's waiting fraction against 1 - (loop time with free
    data) / (loop time with this loader), for a loop with a known step."""
    step, batches = 0.02, 30
    free = [torch.arange(4)] * batches
    started = time.perf_counter()
    for _batch in free:
        _busy(step)
    free_time = time.perf_counter() - started

    # 4 samples x 15 ms per batch on one worker: ~60 ms of waiting per 20 ms step.
    loader = torch.utils.data.DataLoader(Sleepy(4 * batches, 0.015), batch_size=4, num_workers=1)
    watched = nostall.watch(loader)
    started = time.perf_counter()
    for _batch in watched:
        _busy(step)
    loaded_time = time.perf_counter() - started
    expected = 1.0 - free_time / loaded_time
    assert watched.stats.waiting_fraction == pytest.approx(expected, abs=0.05)
    assert 0.4 < expected < 0.9  # the loop really did wait, and really did work
    watched.close()


def test_watch_on_torch_persistent_counts_pauses():
    loader = torch.utils.data.DataLoader(Indexed(30), batch_size=10, num_workers=2, persistent_workers=True)
    watched = nostall.watch(loader)
    for _ in range(3):
        assert len(watched) == 3
        for _batch in watched:
            pass
    assert [e.batches for e in watched.stats.epochs] == [3, 3, 3]
    assert len(watched.stats.pauses_s) == 2
    assert watched.stats.worker_busy is None  # torch does not say what its workers do
    loader._iterator._shutdown_workers()
    watched.close()


def test_log_every(caplog):
    loader = nostall.DataLoader(Indexed(40), batch_size=4)
    loader.stats.log_every(5)
    with caplog.at_level(logging.INFO, logger="nostall"):
        for _batch in loader:
            pass
    lines = [r.getMessage() for r in caplog.records if r.name == "nostall"]
    assert len(lines) == 2
    assert lines[0].startswith("epoch 0, batches 1-5: waited") and "trained" in lines[0]
    assert lines[1].startswith("epoch 0, batches 6-10:")
    with pytest.raises(ValueError, match="`batches` must be an int >= 0; got -1"):
        loader.stats.log_every(-1)
    loader.close()


def test_export_trace(tmp_path):
    with nostall.DataLoader(Indexed(64), batch_size=8, num_workers=2) as loader:
        for _ in range(2):
            for _batch in loader:
                time.sleep(0.001)
        path = loader.stats.export_trace(tmp_path / "trace.json")
    events = json.loads(path.read_text())["traceEvents"]
    names = {(e["pid"], e["name"]) for e in events}
    assert (0, "wait") in names and (0, "step") in names
    assert (0, "epoch 0") in names and (0, "epoch 1") in names
    assert (0, "time to first batch") in names and (0, "pause between epochs") in names
    worker_batches = [e for e in events if e["pid"] in (1, 2) and e["ph"] == "X"]
    assert len(worker_batches) >= 16  # both epochs' batches, plus any made ahead
    assert all(e["dur"] >= 0 and e["ts"] >= 0 for e in events if e["ph"] == "X")
    waits = [e for e in events if e["name"] == "wait"]
    assert len(waits) == 16


def test_progress_bar_shows_waiting_fraction():
    pytest.importorskip("tqdm")
    out = io.StringIO()
    loader = nostall.DataLoader(Indexed(12), batch_size=3)
    got = [b.tolist() for b in nostall.progress(loader, file=out, mininterval=0)]
    assert got == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    text = out.getvalue()
    assert "4/4" in text and "waiting for data" in text
    # Anything else is measured through watch().
    out = io.StringIO()
    assert len(list(nostall.progress([1, 2, 3], file=out, mininterval=0))) == 3
    assert "3/3" in out.getvalue() and "waiting for data" in out.getvalue()
    loader.close()
