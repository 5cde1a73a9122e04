"""Exiting, timing out and crashing as torch does (issue 11, section 1).

Every case runs in a real subprocess with a timeout, for torch's DataLoader and for
nostall's on the same script, and checks what a user sees: the exit code, the
printed error, how long the process took to exit once the error was raised, and
that no worker (or nostall factory) process outlives it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import SRC_DIR, TESTS_DIR, wait_gone

EXIT_BOUND_S = 20.0  # generous: torch's child exits ~3 s after the error on 2 busy cores

# One script for every case. argv: impl case num_workers launcher out_dir
#   case: "raise"   - the training step raises on the first batch of a 10,000,000-sample dataset
#         "timeout" - timeout=1 and sample 0 takes 600 s: the loader raises torch's timeout error
#         "exit"    - the training step calls sys.exit(3)
#   launcher: "main" (the script's own process), "mp" (a multiprocessing spawn child),
#             "tmp" (torch.multiprocessing.spawn, how DDP training functions run)
SCRIPT = textwrap.dedent("""
    import os, sys, time
    import multiprocessing as mp
    import psutil
    import torch
    import torch.utils.data
    import nostall
    from datasets import Indexed, SlowSample


    def descendants():
        out = []
        for p in psutil.Process().children(recursive=True):
            try:
                if "resource_tracker" not in " ".join(p.cmdline()):
                    out.append(p.pid)
            except psutil.Error:
                pass
        return out


    def train(impl, case, num_workers, out_dir):
        cls = torch.utils.data.DataLoader if impl == "torch" else nostall.DataLoader
        if case == "timeout":
            loader = cls(SlowSample(100, bad=0, seconds=600), batch_size=1, num_workers=num_workers, timeout=1)
        else:
            loader = cls(Indexed(10_000_000), batch_size=40_960, num_workers=num_workers)
        it = iter(loader)
        if impl == "nostall":
            loader.worker_pids()  # waits until the workers have started
        with open(os.path.join(out_dir, "pids.tmp"), "w") as f:
            f.write(f"{time.time()} " + " ".join(map(str, descendants())))
        os.rename(os.path.join(out_dir, "pids.tmp"), os.path.join(out_dir, "pids"))
        for batch in it:
            if case == "exit":
                sys.exit(3)
            raise ValueError("boom in the training step")


    def ranked(rank, *args):
        train(*args)


    if __name__ == "__main__":
        impl, case, num_workers, launcher, out_dir = sys.argv[1:]
        args = (impl, case, int(num_workers), out_dir)
        if launcher == "main":
            train(*args)
        elif launcher == "mp":
            child = mp.get_context("spawn").Process(target=train, args=args)
            child.start()
            child.join(60)
            print("CHILD-EXITCODE", child.exitcode, flush=True)
            if child.exitcode is None:
                child.kill()
        else:
            import torch.multiprocessing
            try:
                torch.multiprocessing.spawn(ranked, args=args, nprocs=1)
                print("SPAWN-RETURNED", flush=True)
            except Exception as exc:
                print("SPAWN-RAISED", type(exc).__name__, str(exc).replace(chr(10), " | "), flush=True)
""")


def run_case(tmp_path, impl, case, num_workers, launcher):
    """Run SCRIPT; return (completed process, seconds from the loop's start to exit, pids)."""
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([SRC_DIR, TESTS_DIR]))
    try:
        run = subprocess.run([sys.executable, str(script), impl, case, str(num_workers), launcher, str(tmp_path)],
                             capture_output=True, text=True, timeout=90, env=env, cwd=tmp_path)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"{impl}: the script did not end within 90 s; stderr:\n{exc.stderr}") from None
    ended = time.time()
    pid_file = tmp_path / "pids"
    assert pid_file.exists(), f"{impl}: the training function never started; stderr:\n{run.stderr[-3000:]}"
    started, *pids = pid_file.read_text().split()
    return run, ended - float(started), [int(p) for p in pids]


def check_exit(run, took, pids, impl, expect_code, expect_text):
    out = run.stdout + run.stderr
    assert expect_text in out, f"{impl}: {expect_text!r} not printed:\n{out[-3000:]}"
    assert run.returncode == expect_code, f"{impl}: exit code {run.returncode}:\n{out[-3000:]}"
    assert took < EXIT_BOUND_S, f"{impl}: took {took:.1f} s to exit after the loop started"
    assert pids, f"{impl}: no worker process was recorded (is the test broken?)"
    left = wait_gone(pids, 5.0)
    assert not left, f"{impl}: processes {sorted(left)} outlived the process that made the loader"


BOOM = "ValueError: boom in the training step"
TIMEOUT_TEXT = "RuntimeError: DataLoader timed out after 1 seconds"
IMPLS = ["torch", "nostall"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", ["raise", "timeout"])
@pytest.mark.parametrize("impl,num_workers", [("torch", 2), ("nostall", 1), ("nostall", 2)])
def test_multiprocessing_child_exits_with_the_error(tmp_path, impl, case, num_workers):
    """A spawn child whose training function raises while an iterator is alive exits
    with the error, promptly, and takes the loader's processes with it."""
    run, took, pids = run_case(tmp_path, impl, case, num_workers, "mp")
    check_exit(run, took, pids, impl, 0, "CHILD-EXITCODE 1")
    assert (BOOM if case == "raise" else TIMEOUT_TEXT) in run.stderr, run.stderr[-3000:]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", ["raise", "timeout"])
@pytest.mark.parametrize("impl", IMPLS)
def test_torch_multiprocessing_spawn_reports_the_error(tmp_path, impl, case):
    """torch.multiprocessing.spawn (DDP): the rank's error reaches the launcher."""
    run, took, pids = run_case(tmp_path, impl, case, 2, "tmp")
    check_exit(run, took, pids, impl, 0, "SPAWN-RAISED ProcessRaisedException")
    assert (BOOM if case == "raise" else TIMEOUT_TEXT) in run.stdout, run.stdout[-3000:]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", ["raise", "timeout", "exit"])
@pytest.mark.parametrize("impl", IMPLS)
def test_main_process_exits_on_error_or_sys_exit(tmp_path, impl, case):
    """A script's own process: an exception or sys.exit() in the loop ends it."""
    run, took, pids = run_case(tmp_path, impl, case, 2, "main")
    if case == "exit":
        check_exit(run, took, pids, impl, 3, "")
        assert "Traceback" not in run.stderr, run.stderr[-3000:]
    else:
        check_exit(run, took, pids, impl, 1, BOOM if case == "raise" else TIMEOUT_TEXT)
