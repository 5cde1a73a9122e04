"""`nostall bench` and `nostall tune`, end to end: a real subprocess running the CLI
on a small workload, and the files it writes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import yaml

from nostall.cli import _bench
from nostall.cli._measure import MeasureFailed, RunResult, RunSpec


def _cli(*args, cwd=None, timeout=240):
    return subprocess.run([sys.executable, "-m", "nostall", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)


@pytest.mark.timeout(300)
def test_bench_end_to_end(tmp_path):
    out = tmp_path / "out"
    run = _cli("bench", "--workload", "tiny", "--size", "3000", "--batch-size", "64", "--workers", "0", "2",
               "--epochs", "2", "--out", str(out))
    assert run.returncode == 0, run.stderr
    table = run.stdout
    assert "pause between epochs (s)" in table and "verdict" in table
    assert "best throughput" in table
    # Progress while it runs: which configuration, how far along.
    assert "[1/5 0:00 elapsed]" in run.stderr and "[5/5" in run.stderr and "left]" in run.stderr
    payload = json.loads((out / "bench.json").read_text())
    rows = [(r["spec"]["loader"], r["spec"]["num_workers"], r["spec"]["persistent"]) for r in payload["results"]]
    assert rows == [("torch", 0, None), ("nostall", 0, None), ("torch", 2, False), ("torch", 2, True),
                    ("nostall", 2, None)]
    for r in payload["results"]:
        assert r["total_samples"] == 6000 and r["verdict"]
        assert [len(ep) for ep in r["timeline_s"]] == [47, 47]
    png = (out / "bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.timeout(300)
def test_bench_on_a_users_dataset_and_collate(tmp_path):
    (tmp_path / "mydata.py").write_text(textwrap.dedent("""
        import torch

        def make():
            return torch.utils.data.TensorDataset(torch.arange(200).float().unsqueeze(1))

        def collate(samples):
            return torch.cat([s[0] for s in samples])
    """))
    run = _cli("bench", "--dataset", "mydata:make", "--collate", "mydata:collate", "--batch-size", "10",
               "--workers", "0", "2", "--loaders", "nostall", "--epochs", "2", "--batches", "5",
               "--out", "res", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    payload = json.loads((tmp_path / "res" / "bench.json").read_text())
    assert [r["total_samples"] for r in payload["results"]] == [100, 100]  # 2 epochs of 5 batches of 10
    assert payload["results"][0]["spec"]["workload"] == "mydata:make"


def test_bench_rejects_a_missing_factory(tmp_path):
    run = _cli("bench", "--dataset", "nosuchmodule:make", "--workers", "0", "--out", str(tmp_path), timeout=60)
    assert run.returncode != 0
    assert "--dataset: cannot import module 'nosuchmodule'" in run.stdout + run.stderr


def _result(sps, pause, ttfb=0.1, mem=100.0, **spec):
    return RunResult(time_to_first_batch_s=ttfb, epoch_pauses_s=(pause,), median_batch_s=0.01,
                     mean_batch_s=0.01, max_batch_s=0.02, median_wait_s=0.01, samples_per_s=sps,
                     wall_s=1.0, epoch_times_s=(0.5, 0.5), total_samples=100, total_batches=10, epochs=2,
                     peak_memory_mb=mem, base_memory_mb=50.0, memory_metric="pss", peak_processes=1,
                     spec=RunSpec(**spec))


def test_verdicts():
    items = [
        _result(1000, 0.01, loader="nostall", num_workers=2),
        _result(980, 0.01, loader="torch", num_workers=2, persistent=True),
        _result(500, 4.0, ttfb=5.0, mem=400.0, loader="torch", num_workers=8, persistent=False),
        MeasureFailed(RunSpec(num_workers=4), "exited with status 1"),
    ]
    assert _bench.verdicts(items) == [
        "best throughput",
        "98% of best",
        "slow: 50% of best; pauses 4.00 s between epochs; slow start (5.0 s); 4.0x the memory of the leanest",
        "failed",
    ]


@pytest.mark.timeout(300)
def test_tune_end_to_end_on_a_latency_bound_workload(tmp_path):
    out = tmp_path / "loader.yaml"
    run = _cli("tune", "--workload", "latency", "--size", "400", "--batch-size", "8", "--seconds", "0.5",
               "--max-workers", "8", "--out", str(out), "--json", str(tmp_path / "tune.json"))
    assert run.returncode == 0, run.stderr
    assert "nostall: num_workers=" in run.stdout and "torch:   DataLoader(dataset, batch_size=8" in run.stdout
    assert "persistent_workers=True" in run.stdout
    doc = yaml.safe_load(out.read_text())
    from nostall.core._loader_config import LoaderConfig

    config = LoaderConfig.load(out)
    # Each sample waits 10 ms: two workers double the rate, so the search goes past 0 and 2.
    assert config.num_workers >= 4
    assert doc["measured"]["torch_best"]["num_workers"] >= 4
    probes = json.loads((tmp_path / "tune.json").read_text())["probes"]
    assert {p["loader"] for p in probes} == {"torch", "nostall"}


def test_tune_starts_from_the_count_an_auto_run_settled_on(tmp_path):
    stats = tmp_path / "stats.json"
    stats.write_text(json.dumps({"num_workers": 32, "tuner": [{"workers": 3}, {"workers": 6}]}))
    run = _cli("tune", "--workload", "latency", "--size", "400", "--batch-size", "8", "--seconds", "0.5",
               "--max-workers", "12", "--start-from", str(stats), "--out", str(tmp_path / "l.yaml"),
               "--json", str(tmp_path / "tune.json"))
    assert run.returncode == 0, run.stderr
    probes = json.loads((tmp_path / "tune.json").read_text())["probes"]
    tried = [p["num_workers"] for p in probes if p["loader"] == "nostall"]
    assert tried[:3] == [0, 3, 6]  # the baseline, half the tuner's 6, then 6 (then 12 if it gained)
    bad = _cli("tune", "--workload", "latency", "--size", "40", "--start-from", str(tmp_path / "missing.json"))
    assert bad.returncode != 0 and "neither a number of workers nor a readable JSON file" in bad.stderr
