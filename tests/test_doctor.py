"""nostall doctor: each check on real inputs (files, datasets, cgroup/affinity, limits)
and the command line end to end in a subprocess."""

from __future__ import annotations

import argparse
import inspect
import json
import math
import multiprocessing.spawn
import os
import resource
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from nostall.cli import _doctor
from nostall.observe import _cpus
from nostall.observe._cpus import usable_cpus
from nostall.cli._doctor import (
    Finding,
    check_copy_on_read,
    check_cpus,
    check_dev_shm,
    check_main_guard,
    check_open_files,
    check_persistent,
    check_pin_memory,
    check_threads,
    format_report,
)
from nostall.core._torch_versions import accelerator as _accelerator

MB = 1024 * 1024


# --------------------------------------------------------------------------- datasets


class Listed(torch.utils.data.Dataset):
    """The copy-on-read case: one Python dict per sample."""

    def __init__(self, n: int = 200_000) -> None:
        self.samples = [{"path": f"/data/img_{i:06d}.jpg", "label": i % 1000} for i in range(n)]
        self.classes = ["cat", "dog"]  # small: not reported
        self.labels = np.arange(n)  # a numpy array: not a Python container, not reported

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        return torch.zeros(3, 8, 8), self.samples[i]["label"]


class Index:
    def __init__(self) -> None:
        self.by_id = {i: f"id{i}" for i in range(20_000)}


class Nested(torch.utils.data.Dataset):
    """Large containers one level down: an object's attribute and a dict's value."""

    def __init__(self) -> None:
        self.index = Index()
        self.splits = {"train": list(range(30_000)), "val": [1, 2]}

    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int):
        return torch.full((3, 64, 64), float(i)), i


# --------------------------------------------------------------------------- usable CPUs


def test_usable_cpus_reads_affinity_and_cgroup_quota():
    cpus = usable_cpus()
    affinity = len(os.sched_getaffinity(0))
    quota = _cpus.cgroup_cpu_quota()
    assert 0 < cpus.count <= affinity
    if quota is None:
        assert cpus.count == affinity
        assert f"CPU affinity allows {affinity} of the machine's {os.cpu_count()} CPUs" in cpus.source
        assert "no cgroup CPU quota" in cpus.source
    else:
        assert cpus.count == pytest.approx(min(affinity, quota[0]))
        assert "cgroup" in cpus.source and quota[1] in cpus.source
    # Cross-check the files this machine really has.
    v1 = Path("/sys/fs/cgroup/cpu")
    if (v1 / "cpu.cfs_quota_us").exists() and int((v1 / "cpu.cfs_quota_us").read_text()) > 0:
        quota_us = int((v1 / "cpu.cfs_quota_us").read_text())
        assert cpus.count <= quota_us / int((v1 / "cpu.cfs_period_us").read_text())
    v2 = Path("/sys/fs/cgroup/cpu.max")
    if v2.exists():
        limit = _cpus.parse_cpu_max(v2.read_text())
        assert limit is None or cpus.count <= limit


def test_cgroup_file_formats():
    assert _cpus.parse_cpu_max("max 100000\n") is None
    assert _cpus.parse_cpu_max("150000 100000\n") == 1.5
    assert _cpus.parse_cfs_quota("-1", "100000") is None
    assert _cpus.parse_cfs_quota("50000", "100000") == 0.5


@pytest.mark.timeout(30)
def test_usable_cpus_follows_a_restricted_affinity():
    code = "from nostall.observe._cpus import usable_cpus; c = usable_cpus(); print(c.count); print(c.source)"
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=30,
                         preexec_fn=lambda: os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}))
    assert out.returncode == 0, out.stderr
    count, source = out.stdout.splitlines()
    assert float(count) == 1
    assert "1 of the machine's" in source or "cgroup" in source


# --------------------------------------------------------------------------- loader arguments


def test_more_workers_than_usable_cpus_is_a_problem():
    cpus = usable_cpus()
    most = max(1, math.floor(cpus.count))
    [f] = check_cpus(most + 3, cpus)
    assert f.severity == "problem" and f.check == "cpus"
    assert f"num_workers={most + 3} but only {cpus.count:g} CPUs are usable" in f.found
    assert cpus.source in f.found
    assert f"num_workers={most}" in f.fix
    [ok] = check_cpus(1, cpus)
    assert ok.severity == "ok" and ok.fix == ""


def test_persistent_workers_off_is_a_warning():
    [f] = check_persistent(4, persistent=False)
    assert f.severity == "warning"
    assert "persistent_workers=False" in f.found and "4 workers" in f.found
    assert "persistent_workers=True" in f.fix
    assert check_persistent(4, persistent=True)[0].severity == "ok"
    assert check_persistent(0, persistent=False)[0].severity == "ok"


def test_pin_memory_without_accelerator():
    accelerator = _accelerator()
    [f] = check_pin_memory(True, accelerator)
    if accelerator is None:
        assert f.severity == "warning"
        assert "no accelerator" in f.found and "is False" in f.found
        assert "pin_memory=torch.cuda.is_available()" in f.fix
    else:
        assert f.severity == "ok" and accelerator in f.found
    assert check_pin_memory(False, accelerator)[0].severity == "ok"


# --------------------------------------------------------------------------- __main__ guard

UNGUARDED = """\
import torch
from torch.utils.data import DataLoader

dataset = list(range(100))
loader = DataLoader(dataset, batch_size=10, num_workers=2)
for batch in loader:
    print(batch)
"""

GUARDED = """\
from torch.utils.data import DataLoader


def main():
    loader = DataLoader(list(range(100)), batch_size=10, num_workers=2)
    for batch in loader:
        print(batch)


if __name__ == "__main__":
    main()
"""


def _script(tmp_path, text, name="train.py"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_loop_outside_the_guard_under_spawn_is_a_problem(tmp_path):
    [f] = check_main_guard(_script(tmp_path, UNGUARDED), "spawn")
    assert f.severity == "problem" and f.check == "main_guard"
    assert "line 6 iterates a DataLoader" in f.found
    assert "line 5 creates a DataLoader" in f.found
    assert "re-importing train.py" in f.found
    assert f.found.index("line 5") < f.found.index("line 6")
    assert 'if __name__ == "__main__":' in f.fix and "main()" in f.fix
    # The error the message quotes is the one multiprocessing raises.
    assert "An attempt has been made to start a new process before the" in inspect.getsource(multiprocessing.spawn)


def test_unguarded_call_of_a_function_that_iterates_is_a_problem(tmp_path):
    text = GUARDED.replace('if __name__ == "__main__":\n    main()', "main()")
    [f] = check_main_guard(_script(tmp_path, text), "forkserver")
    assert f.severity == "problem"
    assert "line 10 calls main(), which iterates a DataLoader (line 6)" in f.found


def test_guarded_script_and_fork_are_ok(tmp_path):
    [f] = check_main_guard(_script(tmp_path, GUARDED), "spawn")
    assert f.severity == "ok" and "no DataLoader is created or iterated outside" in f.found
    [f] = check_main_guard(_script(tmp_path, UNGUARDED), "fork")
    assert f.severity == "ok" and "it would fail" in f.found and "line 6" in f.found


def test_loader_created_at_import_but_iterated_under_guard_is_a_warning(tmp_path):
    text = UNGUARDED.replace("for batch in loader:\n    print(batch)",
                             'if __name__ == "__main__":\n    for batch in loader:\n        print(batch)')
    [f] = check_main_guard(_script(tmp_path, text), "spawn")
    assert f.severity == "warning" and "line 5 creates a DataLoader" in f.found


def test_start_method_comes_from_the_script(tmp_path):
    text = "import multiprocessing as mp\nmp.set_start_method('spawn')\n" + UNGUARDED
    path = _script(tmp_path, text)
    assert _doctor.resolve_start_method(None, path) == ("spawn", "set in train.py line 2")
    assert _doctor.resolve_start_method("fork", path) == ("fork", "--start-method")
    findings = _doctor.run_doctor(num_workers=1, script=path)
    [f] = [f for f in findings if f.check == "main_guard"]
    assert f.severity == "problem" and "set in train.py line 2" in f.found


def test_unreadable_script_names_the_argument(tmp_path):
    with pytest.raises(ValueError, match=r"--script: cannot read .*missing\.py"):
        check_main_guard(tmp_path / "missing.py", "spawn")
    with pytest.raises(ValueError, match=r"--script: .* line 1"):
        check_main_guard(_script(tmp_path, "def (:\n"), "spawn")


# --------------------------------------------------------------------------- copy on read


def test_large_list_of_dicts_is_reported_with_its_measured_size():
    tracemalloc.start()
    dataset = Listed(200_000)
    allocated = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    findings = check_copy_on_read(dataset, num_workers=4, start_method="fork", available_bytes=1 << 50)
    [f] = findings  # samples only: not the small list, not the numpy array
    assert f.severity == "warning" and f.check == "copy_on_read"
    assert "dataset.samples is a list of 200,000 Python objects" in f.found
    [c] = _doctor.find_large_containers(dataset)
    assert 0.7 * allocated < c.nbytes < 1.4 * allocated, (c.nbytes, allocated)
    assert f"~{c.nbytes / MB:,.0f} MB more memory per worker" in f.found
    assert f"~{4 * c.nbytes / MB:,.0f} MB over 4 workers" in f.found
    assert "nostall.flat(self.samples)" in f.fix and "dataset.samples" in f.fix
    # More growth than the memory available is a problem.
    [f] = check_copy_on_read(dataset, num_workers=4, start_method="spawn", available_bytes=c.nbytes)
    assert f.severity == "problem" and "more than the" in f.found and "With spawn" in f.found
    # No workers, no copies.
    assert check_copy_on_read(dataset, num_workers=0, start_method="fork")[0].severity == "ok"


def test_containers_one_level_down_are_found():
    paths = {c.path: c.count for c in _doctor.find_large_containers(Nested())}
    assert paths == {"dataset.index.by_id": 20_000, "dataset.splits['train']": 30_000}
    [f] = check_copy_on_read(torch.utils.data.TensorDataset(torch.zeros(50_000)), 2, "fork")
    assert f.severity == "ok"


# --------------------------------------------------------------------------- machine limits


def test_dev_shm_compared_with_a_measured_batch():
    batch = _doctor.measure_batch(Nested(), batch_size=8)
    assert batch.nbytes == 8 * 3 * 64 * 64 * 4 + 8 * 8  # float32 images + int64 labels
    assert batch.tensors == 2 and batch.samples == 8
    st = os.statvfs("/dev/shm")
    free = st.f_bavail * st.f_frsize
    [f] = check_dev_shm(2, 2, batch.nbytes)
    assert f.severity == "ok" and "/dev/shm has" in f.found and "x 384 KB per batch" in f.found
    assert "((2 workers x prefetch_factor 2 + 1 in the training loop)" in f.found
    [f] = check_dev_shm(2, 2, free // 2 + 1)  # 5 batches of half the free space
    assert f.severity == "problem" and "No space left on device" in f.found
    assert "docker run --shm-size=" in f.fix and "a smaller batch_size" in f.fix
    [f] = check_dev_shm(4, 2, free // 12)  # 9 batches of 1/12: fits, but over half
    assert f.severity == "warning"
    assert "num_workers=2 or prefetch_factor=1" in f.fix


def test_open_files_limit():
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    needed = _doctor.open_files_needed(4, 2, 2)
    [f] = check_open_files(4, 2, 2)  # this machine's real limit
    assert f"~{needed:,}" in f.found
    if soft == resource.RLIM_INFINITY or soft >= 2 * needed:
        assert f.severity == "ok"
    else:
        assert f.severity in ("problem", "warning") and f"{soft:,}" in f.found
    [f] = check_open_files(8, 2, 3, limits=(64, 64))
    assert f.severity == "problem"
    assert "Open-files limit (ulimit -n) is 64" in f.found
    assert f"needs ~{_doctor.open_files_needed(8, 2, 3):,}" in f.found and "3 tensors per batch" in f.found
    assert "`ulimit -n 4096`" in f.fix and "the hard limit is 64" in f.fix
    assert "set_sharing_strategy('file_system')" in f.fix


def test_threads_times_workers_above_cpus_warns():
    cpus = usable_cpus()
    workers = max(1, math.floor(cpus.count)) + 1
    [f] = check_threads(workers, cpus, env={"OMP_NUM_THREADS": "4"})
    assert f.severity == "warning" and f.check == "threads"
    assert f"OMP_NUM_THREADS=4 is inherited by the {workers} workers" in f.found
    assert f"4 x {workers} = {4 * workers} threads for {cpus.count:g} usable CPUs" in f.found
    assert f"uses {torch.get_num_threads()} torch threads (torch.get_num_threads())" in f.found
    assert "threadpoolctl.threadpool_limits(1)" in f.fix
    [f] = check_threads(workers, cpus, env={}, opencv_loaded=False)
    assert f.severity == "ok" and "set_num_threads(1)" in f.found
    [f] = check_threads(workers, cpus, env={}, opencv_loaded=True)
    assert f.severity == "warning" and "OpenCV" in f.found and "cv2.setNumThreads(1)" in f.fix


# --------------------------------------------------------------------------- report and CLI


def test_run_doctor_and_report():
    findings = _doctor.run_doctor(num_workers=2, dataset=Nested(), batch_size=4)
    assert {f.check for f in findings} == {"cpus", "persistent", "pin_memory", "copy_on_read", "dev_shm",
                                           "open_files", "threads"}
    text = format_report([Finding("ok", "a", "fine"), Finding("problem", "b", "bad", "do this")], ["head"])
    assert text.splitlines()[:5] == ["head", "", "[problem] b", "  found: bad", "  fix:   do this"]
    assert text.endswith("1 problem(s), 0 warning(s), 1 ok")
    with pytest.raises(ValueError, match="--batch-size must be an int >= 1; got 0"):
        _doctor.run_doctor(batch_size=0)


def _parse(argv):
    parser = argparse.ArgumentParser(prog="nostall")
    _doctor.add_parser(parser.add_subparsers())
    return parser.parse_args(argv)


def test_bad_dataset_reference_names_the_argument(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "broken_factory.py").write_text("def make():\n    raise OSError('no such file: /data/x')\n")
    assert _doctor.run(_parse(["doctor", "--dataset", "no_such_module_xyz:make"])) == 2
    assert "--dataset: cannot import module 'no_such_module_xyz'" in capsys.readouterr().err
    assert _doctor.run(_parse(["doctor", "--dataset", "broken_factory:make"])) == 2
    err = capsys.readouterr().err
    assert "--dataset: broken_factory:make() raised OSError: no such file: /data/x" in err


FACTORY = """\
import torch


class Frames(torch.utils.data.Dataset):
    def __init__(self):
        self.samples = [(f"/data/frame_{i:06d}.png", i % 10) for i in range(50_000)]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return torch.zeros(3, 32, 32), self.samples[i][1]


def make():
    return Frames()
"""


@pytest.mark.timeout(60)
def test_cli_end_to_end(tmp_path):
    (tmp_path / "frames_factory.py").write_text(FACTORY)
    script = _script(tmp_path, UNGUARDED)
    report = tmp_path / "out" / "doctor.json"
    workers = max(1, math.floor(usable_cpus().count)) + 62
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    cmd = [sys.executable, "-m", "nostall", "doctor", "--dataset", "frames_factory:make",
           "--script", str(script), "--start-method", "spawn", "--num-workers", str(workers),
           "--no-persistent", "--batch-size", "16", "--json", str(report)]
    out = subprocess.run(cmd, check=False, cwd=tmp_path, capture_output=True, text=True, timeout=60,
                         preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (200, hard)))
    assert out.returncode == 1, out.stdout + out.stderr
    text = out.stdout
    assert "dataset: frames_factory:make -> Frames with 50,000 samples" in text
    for marker in ("[problem] cpus", "[problem] main_guard", "[problem] open_files",
                   "[warning] persistent", "[warning] copy_on_read"):
        assert marker in text, text
    assert "Open-files limit (ulimit -n) is 200" in text
    assert text.index("[problem]") < text.index("[warning]") < text.index("[ok]")
    assert "  fix:   " in text and "dataset.samples" in text and "line 6" in text
    payload = json.loads(report.read_text())
    assert payload["config"]["num_workers"] == workers
    assert payload["config"]["start_method"] == "spawn" and payload["config"]["persistent"] is False
    assert payload["problems"] == 3
    by_check = {f["check"]: f for f in payload["findings"]}
    assert "50,000" in by_check["copy_on_read"]["found"]
    # one batch of 16: 16 x 3x32x32 float32 + 16 int64 labels
    assert f"x {(16 * 3 * 32 * 32 * 4 + 16 * 8) / 1024:,.0f} KB per batch" in by_check["dev_shm"]["found"]
    assert all(set(f) == {"severity", "check", "found", "fix"} for f in payload["findings"])
