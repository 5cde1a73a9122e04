"""Exiting, timing out and crashing as torch does (issue 11, section 1).

Every case runs in a real subprocess with a timeout, for torch's DataLoader and for
nostall's on the same script, and checks what a user sees: the exit code, the
printed error, how long the process took to exit once the error was raised, and
that no worker (or nostall factory) process outlives it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import pytest
import torch
import torch.utils.data
from conftest import SRC_DIR, TESTS_DIR, assert_same_epochs, run_epochs, wait_gone
from toy_datasets import DiesAt, DiesAtStream, DiesOnceAt, HangsAlways, Indexed, RandomValues, exit_in_worker_init

import nostall

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
    from toy_datasets import Indexed, SlowSample


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
    if impl == "torch" and "CHILD-EXITCODE None" in run.stdout:
        # torch's own shutdown sometimes hangs here on a loaded machine; the reference is
        # for reading, the check that matters is nostall's
        pytest.skip("torch's own child did not exit within 60 s on this run")
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


# --------------------------------------------------------------------------- a worker killed by a signal


def torch_death_sentence(dataset, **kw) -> str:
    """What torch's DataLoader says when ``dataset`` ends its worker: the message in the
    error chain that names the worker's pid (torch raises "... (pid(s) N) exited
    unexpectedly" from it, or raises it directly from its SIGCHLD handler)."""
    # The death comes in the first batch: a death while torch is fetching an earlier
    # batch's shared memory from that worker makes torch fail with an EOFError instead.
    it = iter(torch.utils.data.DataLoader(dataset, num_workers=1, **kw))
    try:
        with pytest.raises(RuntimeError) as err:
            for _ in it:
                pass
    finally:
        # Unregister the dead worker from torch's SIGCHLD handler, which would otherwise
        # raise this error again at any later child's exit in this process.
        it._shutdown_workers()
    exc, texts = err.value, []
    while exc is not None:
        texts.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    del err
    for text in texts:
        if re.match(r"DataLoader worker \(pid \d+\)", text):
            return text
    raise AssertionError(f"torch's error names no worker pid: {texts}")


def first_sentence_for(torch_text: str, pid: int) -> str:
    """torch's sentence with ``pid``, up to its first period (torch goes on, for an exit
    code, with "Details are lost due to multiprocessing", which nostall does not say)."""
    text = re.sub(r"\(pid \d+\)", f"(pid {pid})", torch_text)
    return text if "killed by signal" in text else text[: text.index(".") + 1]


def attempts(log) -> list[int]:
    return [int(line) for line in log.read_text().split()] if log.exists() else []


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["SIGSEGV", "SIGBUS", "exit"])
def test_poison_batch_fails_after_two_attempts_with_torchs_sentence(tmp_path, how):
    """A batch that crashes its worker every time: nostall tries it twice (in two
    workers), not once per restart allowed, and its error starts with the sentence
    torch's loader prints for the same death, then names the batch's sample indices."""
    torch_text = torch_death_sentence(DiesAt(64, bad=1, how=how, log=str(tmp_path / "torch")), batch_size=4)
    log = tmp_path / "nostall"
    loader = nostall.DataLoader(DiesAt(64, bad=21, how=how, log=str(log)), batch_size=4, num_workers=2,
                                max_worker_restarts=100)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(RuntimeError) as err:
        warnings.simplefilter("always")
        for _ in loader:
            pass
    text = str(err.value)
    tried = attempts(log)
    assert len(tried) == 2, f"batch attempted {len(tried)} times: {tried}"
    assert text.startswith(first_sentence_for(torch_text, tried[-1])), (torch_text, text)
    assert "batch 5 of epoch 0 (sample indices [20, 21, 22, 23])" in text
    assert f"(pid {tried[0]})" in text  # the earlier death is named too
    assert "poison batch" in text and "num_workers=0" in text
    restarts = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)
                and "started a new worker" in str(w.message)]
    assert len(restarts) == 1 and "while making batch 5 of epoch 0 (sample" in restarts[0], restarts
    assert "If that batch ends a worker again, the loader stops" in restarts[0]
    assert loader.worker_pids() == []  # closed
    assert not wait_gone(tried, 3.0)


@pytest.mark.timeout(60)
def test_iterable_dataset_worker_death_starts_with_torchs_sentence(tmp_path):
    """An iterable dataset's stream cannot move to a new worker: the first death ends
    the epoch, with torch's sentence first."""
    torch_text = torch_death_sentence(DiesAtStream(64, bad=1, how="SIGSEGV", log=str(tmp_path / "t")),
                                      batch_size=4)
    log = tmp_path / "nostall"
    loader = nostall.DataLoader(DiesAtStream(64, bad=9, how="SIGSEGV", log=str(log)), batch_size=4, num_workers=1)
    with pytest.raises(RuntimeError) as err:
        for _ in loader:
            pass
    tried = attempts(log)
    assert len(tried) == 1
    assert str(err.value).startswith(first_sentence_for(torch_text, tried[0])), str(err.value)
    assert "batch 2 of epoch 0" in str(err.value)
    assert "iterable dataset's stream cannot be resumed" in str(err.value)


@pytest.mark.timeout(60)
def test_batch_that_hangs_every_time_stops_after_two_attempts(tmp_path):
    """on_hang='restart' does not loop forever on a sample that never finishes."""
    log = tmp_path / "attempts"
    loader = nostall.DataLoader(HangsAlways(32, bad=6, log=str(log)), batch_size=4, num_workers=2,
                                hang_timeout=1, max_worker_restarts=100)
    with warnings.catch_warnings(), pytest.raises(RuntimeError) as err:
        warnings.simplefilter("ignore", RuntimeWarning)
        for _ in loader:
            pass
    text = str(err.value)
    assert len(attempts(log)) == 2
    assert text.startswith("nostall: nostall worker"), text  # no death sentence: nostall stopped it
    assert "hung on batch 1 of epoch 0" in text and "sample indices [4, 5, 6, 7]" in text
    assert "poison batch" in text


@pytest.mark.timeout(60)
def test_sporadic_kills_are_repaired_and_batches_match_torch():
    """Workers SIGKILLed from outside (not by their batch) are replaced under the default
    settings, as often as they die while batches are delivered; every sample is delivered exactly once in torch's order, and every batch
    is identical to an undisturbed run's (nostall seeds each batch, not each worker)."""
    dataset = RandomValues(96)
    kw = dict(batch_size=4, shuffle=True, num_workers=2)
    torch_loader = torch.utils.data.DataLoader(dataset, generator=_gen(), **kw)
    order = [[b["i"].tolist() for b in torch_loader] for _ in range(3)]
    with nostall.DataLoader(dataset, generator=_gen(), **kw) as loader:
        expected = run_epochs(loader, 3)
    got = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with nostall.DataLoader(dataset, generator=_gen(), **kw) as loader:
            kills, due = 0, 2
            for epoch in range(3):
                batches = []
                for i, batch in enumerate(loader):
                    batches.append(batch)
                    # Five kills in the first two epochs, 5 batches apart (more than the
                    # default max_worker_restarts=3: batches are delivered in between), each
                    # once the previous death was noticed (until then worker_pids() may
                    # list the dead worker; a killed process takes a moment to end). None
                    # after batch 44 of 72, so the batches the killed worker was given
                    # afterwards reveal its death before the run ends, however slowly the
                    # deaths are noticed on a loaded machine.
                    step = epoch * 24 + i
                    if due <= step < 44 and kills < 5 and len(loader.stats.restarts) == kills:
                        os.kill(loader.worker_pids()[kills % 2], signal.SIGKILL)
                        kills, due = kills + 1, step + 5
                got.append(batches)
            restarts = loader.stats.restarts
    assert [[b["i"].tolist() for b in epoch] for epoch in got] == order
    assert_same_epochs(expected, got)
    assert kills == 5 and len(restarts) == 5, restarts
    assert all("was killed by SIGKILL" in r for r in restarts)
    assert not any("poison" in str(w.message) for w in caught)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- open files

KEEPS_BATCHES = textwrap.dedent("""
    import sys
    import torch
    import torch.utils.data
    import nostall
    from toy_datasets import TensorStream

    if __name__ == "__main__":
        impl, numel = sys.argv[1], int(sys.argv[2])
        cls = torch.utils.data.DataLoader if impl == "torch" else nostall.DataLoader
        kept = []
        try:
            for batch in cls(TensorStream(3000, numel), batch_size=1, num_workers=1):
                kept.append(batch)  # a loop that keeps every batch alive
        finally:
            print("KEPT", len(kept), flush=True)
""")


def run_with_open_files_limit(tmp_path, impl, numel, hard):
    import resource

    script = tmp_path / "keeps.py"
    script.write_text(KEEPS_BATCHES)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([SRC_DIR, TESTS_DIR]))
    try:
        return subprocess.run([sys.executable, str(script), impl, str(numel)], capture_output=True, text=True,
                              timeout=60, env=env, cwd=tmp_path,
                              preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard)))
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"{impl}: still running after 60 s with a hard limit of {hard} open files; "
                             f"stderr:\n{exc.stderr}") from None


TORCH_TOO_MANY_FILES = (
    "RuntimeError: Too many open files. Communication with the workers is no longer possible. Please increase "
    "the limit using `ulimit -n` in the shell or change the sharing strategy by calling "
    "`torch.multiprocessing.set_sharing_strategy('file_system')` at the beginning of your code"
)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("impl", IMPLS)
def test_open_files_limit_that_cannot_be_raised(tmp_path, impl):
    """The issue's case: hard limit 100, 1 worker, small tensors, every batch kept.
    torch stops after ~90 batches with a RuntimeError naming both ways out (each kept
    tensor holds a shared-memory file); nostall sends small tensors by value, holds no
    file per kept batch, fits its estimate (the files open now, not an assumed 100) and
    completes."""
    run = run_with_open_files_limit(tmp_path, impl, 4, 100)
    if impl == "torch":
        assert run.returncode == 1, run.stderr[-3000:]
        last = run.stderr.strip().splitlines()[-1]
        assert last == TORCH_TOO_MANY_FILES, run.stderr[-3000:]
        assert "`ulimit -n" in last and "`torch.multiprocessing.set_sharing_strategy('file_system')`" in last, last
    else:
        assert run.returncode == 0, run.stderr[-3000:]
        assert run.stdout.split() == ["KEPT", "3000"], run.stdout


LIMITED = textwrap.dedent("""
    import hashlib, resource, sys
    import torch
    import torch.utils.data
    import nostall


    class Vectors(torch.utils.data.Dataset):
        # A 280 KB tensor per sample: batches travel through shared memory, one descriptor each.
        def __len__(self):
            return 96

        def __getitem__(self, i):
            return i, torch.full((70_000,), float(i))


    if __name__ == "__main__":
        impl, workers, hard = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        cls = torch.utils.data.DataLoader if impl == "torch" else nostall.DataLoader
        loader = cls(Vectors(), batch_size=4, shuffle=True, num_workers=workers,
                     generator=torch.Generator().manual_seed(3))
        digest, batches = hashlib.sha256(), 0
        for epoch in range(2):
            for i, v in loader:
                digest.update(i.numpy().tobytes())
                digest.update(v.numpy().tobytes())
                batches += 1
        print("BATCHES", batches, digest.hexdigest(), flush=True)
""")


@pytest.mark.timeout(180)
@pytest.mark.parametrize("num_workers", [1, 4])
def test_hard_open_files_limit_64_runs_as_torch_does(tmp_path, num_workers):
    """Hard limit 64 (set with setrlimit in the script): nostall used to refuse even one
    worker (it counted 100 files for the process); now it counts the files open, and
    1 or 4 workers deliver the batches torch delivers."""
    script = tmp_path / "limited.py"
    script.write_text(LIMITED)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([SRC_DIR, TESTS_DIR]))
    out = {}
    for impl in IMPLS:
        run = subprocess.run([sys.executable, str(script), impl, str(num_workers), "64"], capture_output=True,
                             text=True, timeout=80, env=env, cwd=tmp_path)
        assert run.returncode == 0, f"{impl}: {run.stderr[-3000:]}"
        out[impl] = run.stdout.split()
    assert out["nostall"] == out["torch"] and out["torch"][:2] == ["BATCHES", "48"], out


@pytest.mark.timeout(60)
def test_open_files_refusal_names_the_worker_count_that_fits(tmp_path):
    """When even the hard limit is short, the error says how many workers fit, and
    that many start and complete under the same limit."""
    script = tmp_path / "limited.py"
    script.write_text(LIMITED)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([SRC_DIR, TESTS_DIR]))
    run = subprocess.run([sys.executable, str(script), "nostall", "16", "40"], capture_output=True, text=True,
                         timeout=50, env=env, cwd=tmp_path)
    assert run.returncode == 1, run.stderr[-3000:]
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("RuntimeError: the open-files limit is 40 (hard limit 40), and 16 workers"), last
    assert "`ulimit -n" in last and "set_sharing_strategy('file_system')" in last, last
    fits = re.search(r"use num_workers=(\d+) \(the most that fit\)", last)
    assert fits and 1 <= int(fits.group(1)) < 16, last
    run = subprocess.run([sys.executable, str(script), "nostall", fits.group(1), "40"], capture_output=True,
                         text=True, timeout=50, env=env, cwd=tmp_path)
    assert run.returncode == 0 and run.stdout.split()[:2] == ["BATCHES", "48"], run.stderr[-3000:]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("impl", IMPLS)
def test_running_out_of_open_files_while_loading_raises_torchs_error(tmp_path, impl):
    """Tensors large enough to travel through shared memory (320 KB) each hold a file
    while alive: with every batch kept, the process runs out after ~190 batches. nostall
    says exactly what torch says (not multiprocessing's "received 0 items of ancdata"),
    then which files and what to do."""
    run = run_with_open_files_limit(tmp_path, impl, 80_000, 200)
    assert run.returncode == 1, run.stderr[-3000:]
    last = run.stderr.strip().splitlines()[-1]
    kept = int(run.stdout.split()[-1])
    assert 150 < kept < 200, run.stdout
    assert last.startswith(TORCH_TOO_MANY_FILES), last
    if impl == "nostall":
        assert "its limit is 200 (hard limit 200)" in last and "`t.clone()`" in last
        assert "ancdata" not in run.stderr


RANKS = textwrap.dedent("""
    import os, sys, time
    import psutil
    import torch.multiprocessing
    import nostall
    from toy_datasets import Sleepy


    def rank_main(rank, out_dir):
        loader = nostall.DataLoader(Sleepy(10**6, 0.01), batch_size=4, num_workers=2)
        it = iter(loader)
        loader.worker_pids()
        pids = [p.pid for p in psutil.Process().children(recursive=True)
                if "resource_tracker" not in " ".join(p.cmdline())]
        with open(os.path.join(out_dir, f"pids.{rank}"), "w") as f:
            f.write(" ".join(map(str, pids)))
        if rank == 0:
            while not os.path.exists(os.path.join(out_dir, "pids.1")):
                time.sleep(0.05)
            raise ValueError("rank 0 fails")
        for batch in it:  # rank 1 trains on until torch's launcher ends it (SIGTERM)
            pass


    if __name__ == "__main__":
        try:
            torch.multiprocessing.spawn(rank_main, args=(sys.argv[1],), nprocs=2)
        except Exception as exc:
            print("SPAWN-RAISED", type(exc).__name__, str(exc).replace(chr(10), " | "), flush=True)
""")


@pytest.mark.timeout(120)
def test_rank_ended_by_torch_spawn_leaves_no_process(tmp_path):
    """One rank fails; torch.multiprocessing.spawn ends the others with SIGTERM (no
    cleanup runs in them). nostall's workers (and factory, if any) of that rank end too (torch's
    own workers are left running in this case, as seen on torch 2.13)."""
    script = tmp_path / "ranks.py"
    script.write_text(RANKS)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([SRC_DIR, TESTS_DIR]))
    run = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True,
                         timeout=90, env=env, cwd=tmp_path)
    assert "SPAWN-RAISED ProcessRaisedException" in run.stdout, run.stderr[-3000:]
    assert "ValueError: rank 0 fails" in run.stdout + run.stderr
    pids = [int(p) for rank in (0, 1) for p in (tmp_path / f"pids.{rank}").read_text().split()]
    assert len(pids) >= 4  # per rank: two workers (fork: forked by the rank itself; no factory until a replacement)
    left = wait_gone(pids, 5.0)
    assert not left, f"processes {sorted(left)} outlived their rank"


@pytest.mark.timeout(60)
def test_death_while_starting_is_not_blamed_on_a_batch(tmp_path):
    """A worker that dies in worker_init_fn was making no batch: no batch is called a
    poison batch; the error says the workers die while starting."""
    torch_text = torch_death_sentence(Indexed(16), batch_size=4, worker_init_fn=exit_in_worker_init)
    loader = nostall.DataLoader(Indexed(64), batch_size=4, num_workers=2, worker_init_fn=exit_in_worker_init)
    with warnings.catch_warnings(), pytest.raises(RuntimeError) as err:
        warnings.simplefilter("ignore", RuntimeWarning)
        for _ in loader:
            pass
    text = str(err.value)
    pid = int(re.match(r"DataLoader worker \(pid (\d+)\)", text).group(1))
    assert text.startswith(first_sentence_for(torch_text, pid)), (torch_text, text)
    assert "exited with code 5 while starting, before its first batch (in worker_init_fn" in text
    assert "poison" not in text and "sample indices" not in text


@pytest.mark.timeout(60)
def test_restarts_are_unlimited_while_batches_are_delivered(tmp_path):
    """Every batch ends its worker once (12 deaths) with max_worker_restarts=1: a batch
    is delivered between any two deaths, so the epoch completes, as torch's batches."""
    expected = [b.tolist() for b in torch.utils.data.DataLoader(Indexed(48), batch_size=4)]
    dataset = DiesOnceAt(48, every=4, flags=str(tmp_path))
    with warnings.catch_warnings(), nostall.DataLoader(dataset, batch_size=4, num_workers=1,
                                                       max_worker_restarts=1) as loader:
        warnings.simplefilter("ignore", RuntimeWarning)
        got = [b.tolist() for b in loader]
        restarts = loader.stats.restarts
    assert got == expected
    assert len(restarts) == 12, restarts


@pytest.mark.timeout(90)
@pytest.mark.parametrize("impl", ["torch", "nostall"])
def test_timeout_counts_only_the_wait_inside_next(impl):
    """torch's `timeout` bounds each wait for a batch, from when next() starts waiting:
    time the loop spends elsewhere (setup, a training step) does not count. Each batch
    takes 3 s and the loop works 2 s before each next(), so no wait exceeds ~1 s."""
    from toy_datasets import Sleepy

    cls = torch.utils.data.DataLoader if impl == "torch" else nostall.DataLoader
    loader = cls(Sleepy(2, delay=3.0), batch_size=1, num_workers=1, timeout=2.5,
                 multiprocessing_context="fork")
    it = iter(loader)  # the worker starts on batch 0 now
    got = []
    for _ in range(2):
        time.sleep(2.0)  # the training step: with the clock started at iter(), batch 0 would time out
        got.append(next(it).tolist())
    assert got == [[0], [1]]
    if impl == "nostall":
        loader.close()
