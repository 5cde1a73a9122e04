"""nostall.cli._measure (figures of one loader run) and the `nostall demo` command."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import time

import psutil
import pytest
import torch

from nostall.cli import _main, _measure
from nostall.cli._measure import (
    MeasureFailed,
    ProcessTreeMemory,
    RunResult,
    RunSpec,
    comparison_specs,
    format_table,
    measure,
    run_isolated,
    run_spec,
)
from nostall.cli._workloads import TinySamples

HAS_PSS = os.path.exists(f"/proc/{os.getpid()}/smaps_rollup")


def _tiny_loader(n=64, batch_size=8, **kw):
    return lambda: torch.utils.data.DataLoader(TinySamples(n), batch_size=batch_size, **kw)


# --------------------------------------------------------------------------- measure()


def test_measure_in_process_gives_sane_figures():
    r = measure(_tiny_loader(), epochs=3)
    assert r.epochs == 3
    assert r.total_samples == 3 * 64 and r.total_batches == 3 * 8
    assert len(r.epoch_pauses_s) == 2 and all(p >= 0 for p in r.epoch_pauses_s)
    assert len(r.epoch_times_s) == 3
    assert 0 < r.time_to_first_batch_s < 5
    assert 0 < r.median_batch_s < 1
    assert 0 < r.mean_batch_s < 1
    assert r.mean_batch_s <= r.max_batch_s < 1
    assert r.median_wait_s <= r.median_batch_s + 1e-6
    assert r.samples_per_s > 0
    assert math.isclose(r.samples_per_s, r.total_samples / r.wall_s)
    assert r.memory_metric == ("pss" if HAS_PSS else "rss")
    assert 10 < r.base_memory_mb <= r.peak_memory_mb
    assert r.peak_processes >= 1
    assert r.max_pause_s == max(r.epoch_pauses_s)


def test_result_round_trips_through_json():
    r = measure(_tiny_loader(n=16), epochs=2)
    r = RunResult(**{**r.__dict__, "spec": RunSpec(workload="tiny", size=16, batch_size=8, epochs=2)})
    text = json.dumps(r.to_dict())  # plain JSON: no NaN, tuples become lists
    back = RunResult.from_dict(json.loads(text))
    assert back == r


def test_median_of_runs():
    a = measure(_tiny_loader(n=32), epochs=3)
    b = measure(_tiny_loader(n=32), epochs=3)
    c = measure(_tiny_loader(n=32), epochs=3)
    m = _measure.median_of_runs([a, b, c])
    assert m.repeats == 3
    assert m.total_samples == 96
    assert m.samples_per_s == sorted([a.samples_per_s, b.samples_per_s, c.samples_per_s])[1]
    assert m.epoch_pauses_s[1] == sorted(r.epoch_pauses_s[1] for r in (a, b, c))[1]
    assert _measure.median_of_runs([a]) is a
    with pytest.raises(ValueError):
        _measure.median_of_runs([])


def test_single_batch_epochs_have_no_time_per_batch():
    r = measure(_tiny_loader(n=8, batch_size=8), epochs=2)
    assert math.isnan(r.median_batch_s) and math.isnan(r.mean_batch_s)
    assert r.to_dict()["median_batch_s"] is None
    assert len(r.epoch_pauses_s) == 1


def test_simulated_training_step_is_counted():
    r = measure(_tiny_loader(n=40, batch_size=8), epochs=3, step_ms=20)
    assert r.median_batch_s >= 0.019
    assert r.median_wait_s < r.median_batch_s
    # The pause is measured from the end of the last step: the step is not in it.
    assert min(r.epoch_pauses_s) < r.median_batch_s


@pytest.mark.timeout(60)
def test_measure_with_workers_counts_them_and_shuts_them_down():
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    r = measure(
        _tiny_loader(n=256, batch_size=16, num_workers=2, persistent_workers=True,
                     multiprocessing_context="fork"),
        epochs=2,
        sample_interval_s=0.01,
    )
    assert r.total_samples == 512
    assert r.peak_processes >= 3  # this process + 2 workers
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        left = {p.pid for p in psutil.Process().children(recursive=True)
                if p.status() != psutil.STATUS_ZOMBIE} - before
        if not left:
            break
        time.sleep(0.05)
    assert not left, f"workers still running after measure(): {left}"


def test_measure_closes_the_loader_on_error():
    closed = []

    class Boom:
        def __iter__(self):
            yield torch.zeros(2)
            raise RuntimeError("boom")

        def close(self):
            closed.append(True)

    with pytest.raises(RuntimeError, match="boom"):
        measure(Boom, epochs=2)
    assert closed == [True]


def test_measure_rejects_bad_epochs():
    with pytest.raises(ValueError, match="epochs"):
        measure(_tiny_loader(), epochs=0)


# --------------------------------------------------------------------------- memory


@pytest.mark.timeout(60)
def test_process_tree_memory_sees_a_child():
    code = textwrap.dedent(
        """
        import sys
        block = bytearray(200 * 1024 * 1024)
        for i in range(0, len(block), 4096):
            block[i] = 1
        print("ready", flush=True)
        sys.stdin.read()
        """
    )
    mem = ProcessTreeMemory()
    alone = mem.sample()
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        with_child = mem.sample()
        only_child = ProcessTreeMemory(pid=child.pid)
        child_mb = only_child.sample()
        assert mem.metric == only_child.metric == ("pss" if HAS_PSS else "rss")
        assert child_mb > 195
        assert with_child - alone > 190
        assert mem.peak_mb >= with_child
        assert mem.peak_processes >= 2
    finally:
        child.stdin.close()
        child.wait(timeout=30)


@pytest.mark.timeout(60)
@pytest.mark.skipif(not HAS_PSS, reason="needs /proc/<pid>/smaps_rollup")
def test_pss_does_not_count_forked_pages_twice():
    # A forked child shares the parent's pages: PSS splits them, RSS counts them twice.
    import numpy as np

    block = np.ones(100 * 1024 * 1024 // 8)  # 100 MB, touched
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os.close(w)
        os.read(r, 1)
        os._exit(0)
    try:
        os.close(r)
        time.sleep(0.2)
        pss = ProcessTreeMemory().sample()
        rss = sum(p.memory_info().rss for p in [psutil.Process(), *psutil.Process().children()]) / 2**20
        assert rss - pss > 80, (rss, pss)
    finally:
        os.write(w, b"x")
        os.close(w)
        os.waitpid(pid, 0)
    del block


def test_sampler_thread_starts_and_stops():
    mem = ProcessTreeMemory(interval_s=0.01).start()
    time.sleep(0.1)
    peak = mem.stop()
    assert mem.samples >= 3
    assert peak > 0


# --------------------------------------------------------------------------- RunSpec and friends


def test_run_spec_validation():
    with pytest.raises(ValueError, match="loader"):
        RunSpec(loader="tensorflow")
    with pytest.raises(ValueError, match="workload"):
        RunSpec(workload="imagenet")
    with pytest.raises(ValueError, match="num_workers"):
        RunSpec(num_workers=-1)
    with pytest.raises(ValueError, match="start_method"):
        RunSpec(num_workers=2, start_method="threads")
    with pytest.raises(ValueError, match="batch_size"):
        RunSpec(batch_size=0)
    s = RunSpec(num_workers=0, start_method="spawn", persistent=True)
    assert s.start_method is None and s.persistent is None
    assert RunSpec.from_dict(s.to_dict()) == s
    assert RunSpec(loader="nostall", num_workers=2).persistent_effective is True
    assert RunSpec(loader="torch", num_workers=2).persistent_effective is False


def test_comparison_matrix():
    specs = comparison_specs(workers=[0, 2, 4], start_methods=["fork", "spawn"], workload="tiny", size=8)
    labels = [s.label() for s in specs]
    assert labels[:2] == ["torch workers=0", "nostall workers=0"]
    # per (workers, method): torch transient, torch persistent, nostall
    assert len(specs) == 2 + 2 * 2 * 3
    assert labels[2:5] == ["torch workers=2 fork transient", "torch workers=2 fork persistent",
                           "nostall workers=2 fork persistent"]
    only_torch = comparison_specs(workers=[0, 2], start_methods=["fork"], loaders=["torch"])
    assert [s.loader for s in only_torch] == ["torch"] * 3


def test_run_spec_in_process_on_tiny_workload():
    r = run_spec(RunSpec(workload="tiny", size=64, batch_size=16, epochs=2))
    assert r.spec is not None and r.spec.workload == "tiny"
    assert r.total_samples == 128
    table = format_table([r])
    assert "time to first batch (s)" in table and "| torch " in table
    assert table.count("\n") == 2


@pytest.mark.timeout(120)
def test_run_isolated_in_a_fresh_process():
    spec = RunSpec(workload="tiny", size=256, batch_size=32, num_workers=2, start_method="fork",
                   persistent=True, epochs=2)
    r = run_isolated(spec, timeout=100)
    assert r.spec == spec
    assert r.total_samples == 512
    assert r.peak_processes >= 3
    assert r.orphans_killed == 0
    # The child's memory, not this process's: a fresh torch process, well below 2 GB.
    assert 50 < r.peak_memory_mb < 2000


@pytest.mark.timeout(60)
def test_run_isolated_timeout_kills_the_run():
    spec = RunSpec(workload="tiny", size=10_000_000, batch_size=1, epochs=50)
    t = time.monotonic()
    with pytest.raises(MeasureFailed, match="timed out"):
        run_isolated(spec, timeout=3)
    assert time.monotonic() - t < 30


@pytest.mark.timeout(60)
def test_run_isolated_reports_a_failing_run(tmp_path):
    spec = RunSpec(workload="spotgeo", size=3, cache_dir=str(tmp_path / "no-such" / "\0bad"))
    with pytest.raises(MeasureFailed, match="exited with status") as info:
        run_isolated(spec, timeout=50)
    assert "Error" in info.value.output_tail


@pytest.mark.timeout(120)
def test_nostall_loader_when_available():
    if not _measure.nostall_available():
        pytest.skip("nostall.DataLoader is not importable yet")
    r = run_spec(RunSpec(loader="nostall", workload="tiny", size=256, batch_size=32, num_workers=2,
                         start_method="fork", epochs=2))
    assert r.total_samples == 512


# --------------------------------------------------------------------------- CLI


@pytest.mark.timeout(120)
def test_demo_command_end_to_end(tmp_path):
    out = tmp_path / "demo.json"
    run = subprocess.run([sys.executable, "-m", "nostall", "demo", "--frames", "8", "--batch-size", "4",
                          "--epochs", "2", "--workers", "0", "--loaders", "torch",
                          "--cache-dir", str(tmp_path / "cache"), "--json", str(out)],
                         capture_output=True, text=True, timeout=110)
    assert run.returncode == 0, run.stderr
    assert "pause between epochs (s)" in run.stdout
    assert "| torch " in run.stdout
    payload = json.loads(out.read_text())
    assert payload["command"].startswith("nostall demo --frames 8")
    assert len(payload["results"]) == 1 and not payload["failures"]
    assert payload["results"][0]["total_samples"] == 16


def test_cli_without_command_prints_help(capsys):
    assert _main.main([]) == 2
    assert "demo" in capsys.readouterr().out


def test_cli_rejects_bad_numbers():
    with pytest.raises(SystemExit):
        _main.main(["demo", "--frames", "0"])
    with pytest.raises(SystemExit):
        _main.main(["demo", "--workers", "-1"])


@pytest.mark.timeout(60)
def test_python_dash_m_nostall_help():
    out = subprocess.run([sys.executable, "-m", "nostall", "demo", "--help"], capture_output=True,
                         text=True, timeout=50)
    assert out.returncode == 0, out.stderr
    assert "--full" in out.stdout and "--start-method" in out.stdout


# --------------------------------------------------------------------------- benchmark script


def _bench_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_core.py"
    spec = importlib.util.spec_from_file_location("bench_core", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake(loader, nw, method=None, persistent=None, pause=0.1, batch=0.05, sps=100.0, mem=300.0, ttfb=1.0,
          workload="spotgeo"):
    spec = RunSpec(loader=loader, workload=workload, num_workers=nw, start_method=method, persistent=persistent)
    return RunResult(time_to_first_batch_s=ttfb, epoch_pauses_s=(pause, pause / 2), median_batch_s=batch,
                     mean_batch_s=batch, max_batch_s=batch, median_wait_s=batch / 2, samples_per_s=sps, wall_s=10.0,
                     epoch_times_s=(3.0, 3.0, 3.0), total_samples=960, total_batches=30, epochs=3,
                     peak_memory_mb=mem, base_memory_mb=200.0, memory_metric="pss", peak_processes=3,
                     spec=spec)


def test_bench_ratios_on_known_figures():
    bench = _bench_module()
    main = [
        _fake("torch", 8, "spawn", False, pause=20.0, ttfb=18.0, sps=50.0),
        _fake("torch", 8, "spawn", True, pause=0.8, ttfb=6.0, sps=250.0, mem=1400.0),
        _fake("nostall", 8, "spawn", None, pause=0.05, ttfb=2.0, sps=300.0, mem=700.0),
    ]
    tiny = [
        _fake("torch", 0, workload="tiny", sps=80_000.0),
        _fake("torch", 2, "fork", True, workload="tiny", sps=40_000.0),
        _fake("nostall", 2, "fork", None, workload="tiny", sps=120_000.0),
    ]
    rows = {(r["ratio"], r["config"]): r["value"] for r in bench.compute_ratios(main, tiny)}
    assert rows[("time to first batch", "spawn, 8 workers, vs torch transient")] == pytest.approx(2 / 18)
    assert rows[("time to first batch", "spawn, 8 workers, vs torch persistent")] == pytest.approx(2 / 6)
    assert rows[("max pause", "8 workers, spawn, vs torch persistent")] == pytest.approx(0.05 / 0.8)
    assert rows[("max pause / own time per batch", "8 workers, spawn")] == pytest.approx(1.0)
    assert rows[("max pause / own longest in-epoch gap", "8 workers, spawn")] == pytest.approx(1.0)
    assert rows[("samples/s", "8 workers, spawn, vs torch persistent")] == pytest.approx(1.2)
    assert rows[("peak PSS", "8 workers, spawn, vs torch persistent")] == pytest.approx(0.5)
    assert rows[("tiny samples/s", "2 workers, vs torch persistent")] == pytest.approx(3.0)
    assert rows[("tiny samples/s", "nostall vs torch 0 workers")] == pytest.approx(1.5)
    assert "| time to first batch |" in bench.format_ratios(bench.compute_ratios(main, tiny))


@pytest.mark.timeout(120)
def test_bench_script_smoke(tmp_path, capsys):
    bench = _bench_module()
    out = tmp_path / "bench.json"
    rc = bench.main(["--frames", "8", "--batch-size", "4", "--epochs", "2", "--workers", "0",
                     "--methods", "fork", "--loaders", "torch", "--tiny-samples", "2048",
                     "--cache-dir", str(tmp_path / "cache"), "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "### Tiny samples" in printed and "### Ratios" in printed
    payload = json.loads(out.read_text())
    assert len(payload["spotgeo"]) == 1 and len(payload["tiny"]) == 3
    assert payload["duration_s"] > 0 and not payload["failures"]
