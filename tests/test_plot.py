"""The PNG figure of ``nostall bench`` (nostall.cli._plot.plot_bench).

Records are synthetic (no loader is run): batch arrivals with epochs and pauses
shaped like a real sweep (torch's transient workers pause for seconds with spawn,
persistent ones for a fraction of a second, nostall hardly at all).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
from conftest import SRC_DIR

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _record(loader, workers, method=None, persistent=None, *, pause, first, batch_s,
            epochs=3, batches=40, batch_size=32, workload="spotgeo", timeline=True):
    """One run record as the bench JSON holds it, with evenly spaced arrivals."""
    arrivals, now = [], first
    for epoch in range(epochs):
        if epoch:
            now += pause
        times = []
        for b in range(batches):
            if b:
                now += batch_s * (1.0 + 0.15 * ((b * 7 + epoch) % 5 - 2) / 2)  # a little jitter
            times.append(round(now, 6))
        arrivals.append(times)
    total = epochs * batches * batch_size
    record = {
        "spec": {"loader": loader, "workload": workload, "size": batches * batch_size,
                 "batch_size": batch_size, "num_workers": workers, "start_method": method,
                 "persistent": persistent, "epochs": epochs, "step_ms": 0.0},
        "time_to_first_batch_s": first,
        "epoch_pauses_s": [pause] * (epochs - 1),
        "mean_batch_s": batch_s,
        "samples_per_s": total / now,
        "peak_memory_mb": 200.0 + 150.0 * workers,
    }
    if timeline:
        record["timeline_s"] = arrivals
    return record


def synthetic_records(workers=(0, 2, 4, 8), methods=("fork", "spawn")):
    """A full sweep: torch transient and persistent, nostall, for each start method."""
    records = [
        _record("torch", 0, pause=0.06, first=0.09, batch_s=0.058),
        _record("nostall", 0, pause=0.06, first=0.07, batch_s=0.058),
    ]
    for w in workers:
        if not w:
            continue
        for method in methods:
            spawn = method == "spawn"
            start = (0.45 * w) if spawn else (0.08 + 0.035 * w)
            batch_s = 0.034 + 0.004 * w  # two cores: more workers only add contention
            records += [
                _record("torch", w, method, False, pause=(0.7 * w if spawn else 0.05 + 0.04 * w),
                        first=start, batch_s=batch_s),
                _record("torch", w, method, True, pause=0.06 + 0.03 * w, first=start, batch_s=batch_s),
                _record("nostall", w, method, None, pause=0.01 + 0.005 * w,
                        first=(0.9 if spawn else start), batch_s=batch_s * 0.97),
            ]
    return records


def _size(path):
    from PIL import Image

    with Image.open(path) as image:
        return image.format, image.size


@pytest.fixture
def plot_bench():
    pytest.importorskip("matplotlib")
    from nostall.cli._plot import plot_bench

    return plot_bench


def test_full_sweep_is_a_1600x700_png(plot_bench, tmp_path):
    out = plot_bench(synthetic_records(), tmp_path / "figs" / "bench.png", title="A title")
    assert out == tmp_path / "figs" / "bench.png"
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert _size(out) == ("PNG", (1600, 700))


def test_failures_and_runs_without_timelines_are_tolerated(plot_bench, tmp_path):
    records = synthetic_records(workers=(0, 2), methods=("fork",))
    records.insert(1, {"spec": records[2]["spec"], "reason": "timed out after 900 s"})
    records[3].pop("timeline_s")
    records[4]["timeline_s"] = []
    records[5]["samples_per_s"] = None  # a NaN written by the JSON
    assert _size(plot_bench(records, str(tmp_path / "a.png"))) == ("PNG", (1600, 700))

    # Old results: no timelines at all, the throughput panel is still drawn.
    for r in records:
        r.pop("timeline_s", None)
    assert _size(plot_bench(records, tmp_path / "b.png")) == ("PNG", (1600, 700))


def test_no_successful_run_is_an_error(plot_bench, tmp_path):
    failed = [{"spec": {"loader": "torch", "num_workers": 2}, "reason": "crashed"}]
    with pytest.raises(ValueError, match="no successful run"):
        plot_bench(failed, tmp_path / "c.png")


def test_explicit_timeline_runs_and_mixed_workloads(plot_bench, tmp_path):
    records = synthetic_records(workers=(0, 2), methods=("fork",))
    records.append(_record("torch", 2, "fork", False, pause=0.02, first=0.05, batch_s=0.001,
                           workload="tiny", batches=400, batch_size=256))
    assert _size(plot_bench(records, tmp_path / "d.png", timeline_runs=[0, 4])) == ("PNG", (1600, 700))
    with pytest.raises(ValueError, match="out of range"):
        plot_bench(records, tmp_path / "e.png", timeline_runs=[len(records)])


def test_timeline_shows_the_worst_torch_pause_against_the_others():
    from nostall.cli._plot import _pick_timeline_runs

    records = synthetic_records()
    chosen = [r["spec"] for _, r in _pick_timeline_runs(list(enumerate(records)))]
    picked = [(s["loader"], s["num_workers"], s["start_method"], s["persistent"]) for s in chosen]
    assert picked == [
        ("torch", 8, "spawn", False),
        ("torch", 8, "spawn", True),
        ("nostall", 8, "spawn", None),
        ("torch", 0, None, None),
    ]

    # Without torch's persistent run at that size, the others remain, in order.
    fewer = [r for r in copy.deepcopy(records)
             if not (r["spec"]["loader"] == "torch" and r["spec"]["persistent"] is True)]
    chosen = [r["spec"] for _, r in _pick_timeline_runs(list(enumerate(fewer)))]
    assert [(s["loader"], s["num_workers"]) for s in chosen] == [("torch", 8), ("nostall", 8), ("torch", 0)]


def test_missing_matplotlib_says_how_to_install_it(tmp_path):
    code = (
        "import sys\n"
        "sys.modules['matplotlib'] = None  # as if it were not installed\n"
        "import nostall\n"  # importing nostall never needs matplotlib
        "from nostall.cli._plot import plot_bench\n"
        "try:\n"
        "    plot_bench([], sys.argv[1])\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
        "else:\n"
        "    sys.exit('no ImportError')\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (SRC_DIR, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "x.png")],
                          check=False, capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "pip install 'nostall[plot]'" in proc.stdout
    assert "pip install matplotlib" in proc.stdout
    assert not (tmp_path / "x.png").exists()
