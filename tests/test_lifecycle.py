"""Contract 6 - lifecycle: every way a loader ends releases its processes, threads
and shared-memory files; interpreter exit and Ctrl-C leave no orphan.

nostall-only: torch's own shutdown behaviour is different (and not the contract).
Worker processes are found as descendants of the current process (psutil,
recursive), minus multiprocessing's per-interpreter helpers (resource tracker,
forkserver), which are not the loader's.
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from conftest import REPO_DIR, SRC_DIR, TESTS_DIR, alive, descendant_pids, nostall_module, wait_gone
from toy_datasets import Indexed

SHM = "/dev/shm"
WORKER_TYPES = ["process", "thread"]


def shm_files():
    return set(os.listdir(SHM)) if os.path.isdir(SHM) else set()


def held_by_other_processes(names):
    """The /dev/shm files among ``names`` that a process outside this test's tree has
    mapped or open: other programs on a shared machine create such files too, and
    they are not this loader's leftovers."""
    ours = {os.getpid()} | descendant_pids(include_helpers=True)
    held = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in ours:
            continue
        try:
            with open(f"/proc/{entry}/maps") as f:
                text = f.read()
            fds = [os.readlink(f"/proc/{entry}/fd/{fd}") for fd in os.listdir(f"/proc/{entry}/fd")]
        except OSError:
            continue
        for name in names:
            path = f"{SHM}/{name}"
            if path in text or any(fd.startswith(path) for fd in fds):
                held.add(name)
    return held


class Snapshot:
    """What exists before a loader is made: processes, threads, /dev/shm files."""

    def __init__(self):
        gc.collect()  # earlier tests' garbage must not count as this test's leftovers
        self.pids = descendant_pids()
        self.threads = set(threading.enumerate())
        self.shm = shm_files()
        self.worker_pids = set()

    def record_workers(self):
        """Call while the loader is running: remember its worker processes."""
        self.worker_pids |= descendant_pids() - self.pids

    def assert_released(self, what, timeout=5.0):
        gc.collect()  # batches from the loop are garbage now; their storage may go
        left = wait_gone(self.worker_pids | (descendant_pids() - self.pids), timeout)
        assert not left, f"{what}: worker processes still running: {sorted(left)}"
        extra = [t for t in threading.enumerate() if t not in self.threads]
        for t in extra:
            t.join(timeout)
        extra = [t.name for t in extra if t.is_alive()]
        assert not extra, f"{what}: threads still running: {extra}"
        # Other programs on a shared machine create and remove /dev/shm files all the
        # time: a leftover of ours is a new file no other process holds, still there
        # after a short wait.
        deadline = time.monotonic() + 3.0
        while True:
            new_shm = shm_files() - self.shm
            new_shm -= held_by_other_processes(new_shm)
            new_shm &= shm_files()
            if not new_shm or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert not new_shm, f"{what}: new files left in /dev/shm: {sorted(new_shm)}"


def make(worker_type, n=64, **kw):
    nostall = nostall_module()
    kw.setdefault("num_workers", 2)
    kw.setdefault("batch_size", 4)
    if worker_type == "process":
        kw.setdefault("multiprocessing_context", "fork")
    return nostall.DataLoader(Indexed(n), worker_type=worker_type, **kw)


def _started_workers(snap, worker_type):
    snap.record_workers()
    if worker_type == "process":
        assert snap.worker_pids, "no worker process found while iterating (is the test broken?)"


@pytest.mark.parametrize("worker_type", WORKER_TYPES)
def test_close_mid_epoch(worker_type):
    snap = Snapshot()
    loader = make(worker_type)
    it = iter(loader)
    next(it)
    _started_workers(snap, worker_type)
    loader.close()
    snap.assert_released("close() mid-epoch")
    loader.close()  # idempotent


@pytest.mark.parametrize("worker_type", WORKER_TYPES)
def test_close_after_epochs(worker_type):
    snap = Snapshot()
    loader = make(worker_type)
    for _ in range(2):
        assert len(list(loader)) == 16
        _started_workers(snap, worker_type)
    loader.close()
    snap.assert_released("close() after 2 epochs")


@pytest.mark.timeout(60)
def test_close_spawn():
    snap = Snapshot()
    loader = make("process", multiprocessing_context="spawn")
    next(iter(loader))
    _started_workers(snap, "process")
    loader.close()
    snap.assert_released("close() with spawn")


@pytest.mark.parametrize("worker_type", WORKER_TYPES)
def test_context_manager(worker_type):
    snap = Snapshot()
    with make(worker_type) as loader:
        for i, batch in enumerate(loader):
            if i == 0:
                _started_workers(snap, worker_type)
            if i == 3:
                break
    del batch  # a batch the user still holds may keep its shared memory; drop it
    snap.assert_released("leaving the with block")


@pytest.mark.parametrize("worker_type", WORKER_TYPES)
def test_exception_in_loop_body_inside_with(worker_type):
    snap = Snapshot()
    with pytest.raises(ZeroDivisionError):
        with make(worker_type) as loader:
            for _ in loader:
                _started_workers(snap, worker_type)
                1 / 0
    snap.assert_released("exception raised in the loop body inside `with`")


@pytest.mark.parametrize("worker_type", WORKER_TYPES)
def test_exception_in_loop_body_then_garbage_collected(worker_type):
    snap = Snapshot()

    def train():
        loader = make(worker_type)
        for _ in loader:
            _started_workers(snap, worker_type)
            raise ZeroDivisionError("user code")

    with pytest.raises(ZeroDivisionError):
        train()
    gc.collect()
    snap.assert_released("exception in the loop body, loader unreachable, gc.collect()")


@pytest.mark.parametrize("worker_type", WORKER_TYPES)
@pytest.mark.parametrize("mid_epoch", [False, True], ids=["idle", "mid-epoch"])
def test_del_and_gc(worker_type, mid_epoch):
    snap = Snapshot()
    loader = make(worker_type)
    it = iter(loader)
    next(it)
    _started_workers(snap, worker_type)
    if not mid_epoch:
        for _batch in it:
            pass
    del loader, it
    gc.collect()
    snap.assert_released("del loader; gc.collect()")


def test_transient_workers_end_with_the_epoch():
    """persistent_workers=False: the epoch's workers are gone once it is exhausted."""
    snap = Snapshot()
    loader = make("process", persistent_workers=False)
    it = iter(loader)
    next(it)
    _started_workers(snap, "process")
    for batch in it:
        pass
    del batch
    left = wait_gone(snap.worker_pids, 5.0)
    assert not left, f"transient workers still running after the epoch ended: {sorted(left)}"
    loader.close()
    snap.assert_released("close() of a transient loader")


# --------------------------------------------------------------------------- subprocesses

CHILD = textwrap.dedent("""
    import os, sys, itertools
    import psutil
    import nostall
    from toy_datasets import Indexed

    def main():
        worker_type, mode = sys.argv[1], sys.argv[2]
        kw = dict(multiprocessing_context=sys.argv[3]) if worker_type == "process" else {}
        loader = nostall.DataLoader(Indexed(4000), batch_size=4, num_workers=2,
                                    worker_type=worker_type, **kw)
        it = iter(loader)
        next(it)
        pids = [p.pid for p in psutil.Process().children(recursive=True)
                if "resource_tracker" not in " ".join(p.cmdline())]
        print("pids", *pids, flush=True)
        if mode == "exit":
            print("exiting", flush=True)
            return loader, it  # kept alive until interpreter exit; never closed
        print("started", flush=True)
        for epoch in itertools.count():
            for batch in loader:
                pass

    if __name__ == "__main__":
        KEEP = main()
""")


def _spawn_child(tmp_path, worker_type, mode, start_method, new_session=False):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([SRC_DIR, TESTS_DIR, env.get("PYTHONPATH", "")])
    return subprocess.Popen(
        [sys.executable, str(script), worker_type, mode, start_method],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_DIR, env=env,
        start_new_session=new_session,
    )


def _read_until(proc, marker, timeout=60.0):
    """Read the child's stdout lines until ``marker``; return the worker pids printed."""
    pids = []
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        for line in proc.stdout:
            if line.startswith("pids"):
                pids = [int(p) for p in line.split()[1:]]
            if line.strip() == marker:
                return pids
    finally:
        timer.cancel()
    raise AssertionError(f"child ended before printing {marker!r}: rc={proc.wait()} "
                         f"stderr={proc.stderr.read()[-3000:]}")


@pytest.mark.timeout(90)
@pytest.mark.parametrize("worker_type,start_method", [
    ("process", "fork"), ("process", "spawn"), ("thread", "fork"),
], ids=["process-fork", "process-spawn", "thread"])
def test_interpreter_exit_without_close(tmp_path, worker_type, start_method):
    nostall_module()
    proc = _spawn_child(tmp_path, worker_type, "exit", start_method)
    try:
        pids = _read_until(proc, "exiting")
        t0 = time.monotonic()
        try:
            _, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError("interpreter did not exit within 10 s after the script ended "
                                 "with an unclosed loader") from None
        took = time.monotonic() - t0
        assert proc.returncode == 0, f"exit code {proc.returncode}; stderr:\n{err[-3000:]}"
        left = wait_gone(pids, 3.0)
        assert not left, f"worker processes survived interpreter exit: {sorted(left)}"
        assert "Traceback" not in err, f"stderr at exit:\n{err[-3000:]}"
        assert "leaked" not in err, f"stderr at exit:\n{err[-3000:]}"
        assert took < 10
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("target", ["main-pid", "process-group"])
@pytest.mark.parametrize("worker_type", WORKER_TYPES)
def test_ctrl_c_mid_epoch(tmp_path, worker_type, target):
    """SIGINT to the main process only (kill -INT pid) or to the whole foreground
    process group (what a terminal's Ctrl-C does): exit within 2 s, no orphan."""
    nostall_module()
    proc = _spawn_child(tmp_path, worker_type, "loop", "fork", new_session=True)
    try:
        pids = _read_until(proc, "started")
        if worker_type == "process":
            assert pids, "child reported no worker processes"
        if target == "main-pid":
            os.kill(proc.pid, signal.SIGINT)
        else:
            os.killpg(proc.pid, signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=2)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
            raise AssertionError(f"still running 2 s after SIGINT; stderr:\n{err[-3000:]}") from None
        assert proc.returncode != 0
        assert "KeyboardInterrupt" in err or proc.returncode == -signal.SIGINT, err[-3000:]
        assert "leaked semaphore" not in err and "resource_tracker" not in err, err[-3000:]
        left = wait_gone(pids, 3.0)
        assert not left, f"orphaned worker processes after Ctrl-C: {sorted(left)}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in alive(pids if "pids" in locals() else []):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
