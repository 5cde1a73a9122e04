"""Files a loader's workers make: nothing another user can plant a symlink at, nothing
left behind however the loader ends (issue 12).

Stack dumps live in an anonymous memfd per worker (read through /proc/<pid>/fd), so
the temp directory stays untouched: checked with TMPDIR pointing at a directory of the
test's own, after close, after a worker's SIGKILL, and after SIGKILL or SIGTERM of the
process that made the loader. A full /dev/shm is a real tiny tmpfs mounted in a
private mount namespace (``unshare``).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest
from conftest import SRC_DIR, TESTS_DIR, wait_gone
from toy_datasets import HangsOnce, Indexed, Sleepy

import nostall


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """TMPDIR (and tempfile's cached choice) set to an empty directory of this test."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", None)  # recomputed from TMPDIR, inherited by forks
    return tmp


def _stack_fd(pid: int, within: float = 30.0) -> str:
    """The worker's stack memfd; a worker that has not delivered yet may still be
    starting (the memfd is made first thing in the worker), so look until ``within``."""
    deadline = time.monotonic() + within
    while True:
        for name in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{name}").startswith("/memfd:nostall-stack"):
                    return f"/proc/{pid}/fd/{name}"
            except OSError:
                pass
        if time.monotonic() > deadline:
            raise AssertionError(f"worker {pid} has no stack file")
        time.sleep(0.01)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_planted_symlinks_are_never_followed(private_tmp, tmp_path, context):
    """Symlinks planted at the old predictable names (nostall-stack-<pid>.txt for the
    next 400 pids) point at a file; workers start, a batch hangs and its stack is read.
    The file keeps its content and the temp directory holds only the symlinks."""
    target = tmp_path / "precious.txt"
    target.write_text("do not truncate me\n")
    with open("/proc/sys/kernel/ns_last_pid") as f:
        last = int(f.read())
    planted = {f"nostall-stack-{pid}.txt" for pid in range(last + 1, last + 401)}
    for name in planted:
        os.symlink(target, private_tmp / name)
    dataset = HangsOnce(40, bad=7, flag=str(tmp_path / "hung"))
    loader = nostall.DataLoader(dataset, batch_size=4, num_workers=2, hang_timeout=1.5, on_hang="raise",
                                multiprocessing_context=context)
    with pytest.raises(RuntimeError) as err:
        list(loader)
    assert "Its Python stack" in str(err.value) and "spin_forever" in str(err.value)
    assert target.read_text() == "do not truncate me\n"
    assert set(os.listdir(private_tmp)) == planted


@pytest.mark.timeout(60)
def test_stack_file_is_private_and_in_no_directory(private_tmp):
    with nostall.DataLoader(Indexed(64), batch_size=4, num_workers=2) as loader:
        it = iter(loader)
        next(it)
        pids = loader.worker_pids()
        assert len(pids) == 2
        for pid in pids:
            st = os.stat(_stack_fd(pid))
            assert st.st_mode & 0o777 == 0o600, oct(st.st_mode)
            assert st.st_nlink == 0  # anonymous: no name anywhere
        assert os.listdir(private_tmp) == []


@pytest.mark.timeout(60)
def test_nothing_left_after_close_and_a_worker_sigkill(private_tmp):
    with nostall.DataLoader(Sleepy(64, 0.01), batch_size=4, num_workers=2) as loader:
        it = iter(loader)
        next(it)
        victim = loader.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)
        got = [next(it)] + list(it)  # the worker is replaced and the epoch completes
        assert len(got) == 15
        assert victim not in loader.worker_pids()
    assert loader.worker_pids() == []
    assert os.listdir(private_tmp) == []


STUCK = textwrap.dedent("""
    import os, sys, time
    import torch.utils.data
    import nostall


    class Stuck(torch.utils.data.Dataset):
        def __init__(self, log):
            self.log = log

        def __len__(self):
            return 100

        def __getitem__(self, i):
            with open(self.log, "a") as f:
                f.write(f"{os.getpid()}\\n")
            time.sleep(600)
            return i


    if __name__ == "__main__":
        out = sys.argv[1]
        loader = nostall.DataLoader(Stuck(os.path.join(out, "entered")), batch_size=1, num_workers=2,
                                    multiprocessing_context=sys.argv[2])
        it = iter(loader)
        pids = loader.worker_pids()
        with open(os.path.join(out, "pids.tmp"), "w") as f:
            f.write(" ".join(map(str, pids)))
        os.rename(os.path.join(out, "pids.tmp"), os.path.join(out, "pids"))
        next(it)
""")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("context", ["fork", "spawn"])
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_nothing_left_after_the_main_process_is_killed(tmp_path, context, sig):
    """The issue saw two empty stack files left when workers were stuck in
    __getitem__ at a SIGTERM/SIGKILL of the main process."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    script = tmp_path / "stuck.py"
    script.write_text(STUCK)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([SRC_DIR, TESTS_DIR]), TMPDIR=str(tmp))
    main = subprocess.Popen([sys.executable, str(script), str(tmp_path), context], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        entered = tmp_path / "entered"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and main.poll() is None:
            if (tmp_path / "pids").exists() and entered.exists() and len(entered.read_text().split()) >= 2:
                break
            time.sleep(0.05)
        assert main.poll() is None, main.stderr.read().decode()[-3000:]
        workers = [int(p) for p in (tmp_path / "pids").read_text().split()]
        assert sorted(map(int, entered.read_text().split())) == sorted(workers)  # both stuck in __getitem__
        import psutil

        tree = [p.pid for p in psutil.Process(main.pid).children(recursive=True)]
        main.send_signal(sig)
        main.wait(30)
    finally:
        if main.poll() is None:
            main.kill()
            main.wait()
    left = wait_gone(tree, 15.0)
    assert not left, f"processes {sorted(left)} outlived the main process"
    leftovers = [name for name in os.listdir(tmp) if not name.startswith("pymp-")]
    assert leftovers == [], leftovers


# --------------------------------------------------------------------------- a full /dev/shm

SHM_FULL = textwrap.dedent("""
    import os, sys, warnings
    import torch
    import torch.utils.data
    import nostall


    class Big(torch.utils.data.Dataset):
        def __init__(self, numel):
            self.numel = numel

        def __len__(self):
            return 16

        def __getitem__(self, i):
            return torch.full((self.numel,), float(i))


    if __name__ == "__main__":
        numel, batch_size = int(sys.argv[1]), None if sys.argv[2] == "none" else int(sys.argv[2])
        print("SHM", os.statvfs("/dev/shm").f_blocks * os.statvfs("/dev/shm").f_frsize, flush=True)
        warnings.simplefilter("ignore")
        loader = nostall.DataLoader(Big(numel), batch_size=batch_size, num_workers=2)
        firsts = []
        for epoch in range(2):
            it = iter(loader)
            pids = set(loader.worker_pids())
            firsts += [b.reshape(-1, numel)[:, 0].tolist() for b in it]
        print("FIRSTS", firsts, flush=True)
        print("WORKERS", " ".join(map(str, sorted(pids))), flush=True)
        print("LEFT", " ".join(sorted(os.listdir("/dev/shm"))), flush=True)
""")


def _private_shm_command(size: str) -> list[str] | None:
    """A command prefix that runs a program with its own tmpfs of ``size`` on /dev/shm."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    mount = f"mount -t tmpfs -o size={size} tmpfs /dev/shm && exec \"$0\" \"$@\""
    probe = subprocess.run([unshare, "-rm", "sh", "-c", mount, "true"], capture_output=True, timeout=30)
    return [unshare, "-rm", "sh", "-c", mount] if probe.returncode == 0 else None


@pytest.mark.timeout(120)
@pytest.mark.parametrize("numel,batch_size", [(300_000, "2"), (75_000, "2"), (300_000, "none")],
                         ids=["batch-over-shm", "shm-fills", "unbatched-over-shm"])
def test_full_dev_shm_leaves_no_torch_files(tmp_path, numel, batch_size):
    """/dev/shm is a 1 MB tmpfs: torch's workers fail with "unable to allocate shared
    memory(shm) for file </torch_<pid>_...>: No space left on device" and leave that empty
    file; nostall's switch to the pipe, delivers every batch, and removes it."""
    prefix = _private_shm_command("1m")
    if prefix is None:
        pytest.skip("cannot mount a private tmpfs on /dev/shm here (unshare -rm failed)")
    script = tmp_path / "shm_full.py"
    script.write_text(SHM_FULL)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([SRC_DIR, TESTS_DIR]))
    run = subprocess.run([*prefix, sys.executable, str(script), str(numel), batch_size], capture_output=True,
                         text=True, timeout=100, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = dict(line.split(" ", 1) if " " in line else (line, "") for line in run.stdout.splitlines())
    assert int(lines["SHM"]) == 2**20  # really the tiny tmpfs
    per_batch = 1 if batch_size == "none" else int(batch_size)
    expected = [[float(i) for i in range(b, b + per_batch)] for b in range(0, 16, per_batch)] * 2
    assert eval(lines["FIRSTS"]) == expected
    workers = lines["WORKERS"].split()
    assert len(workers) == 2
    left = lines["LEFT"].split()
    assert not [name for name in left if any(name.startswith(f"torch_{pid}_") for pid in workers)], left
    assert left == [], left


@pytest.mark.timeout(120)
def test_torch_leaves_the_file_nostall_removes(tmp_path):
    """The same full /dev/shm under torch's DataLoader (for the comparison table): its
    worker raises, and the empty torch_<pid>_* file stays."""
    prefix = _private_shm_command("1m")
    if prefix is None:
        pytest.skip("cannot mount a private tmpfs on /dev/shm here (unshare -rm failed)")
    code = textwrap.dedent("""
        import os, torch, torch.utils.data
        data = [torch.zeros(300_000) for _ in range(4)]
        try:
            list(torch.utils.data.DataLoader(data, batch_size=2, num_workers=1))
        except RuntimeError as exc:
            print("RAISED", "No space left on device" in str(exc))
        print("LEFT", len([n for n in os.listdir("/dev/shm") if n.startswith("torch_")]))
    """)
    run = subprocess.run([*prefix, sys.executable, "-c", code], capture_output=True, text=True, timeout=100)
    assert "RAISED True" in run.stdout, run.stdout + run.stderr[-2000:]
    assert int(run.stdout.split("LEFT")[1]) >= 1, run.stdout
