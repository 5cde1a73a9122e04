"""Worker and factory processes say what they are in ps, top and OOM reports (issue 12).

Before, they kept the script's command line (a worker looked like the training script
itself). torch names its workers ``pt_data_worker``. nostall sets the 15-byte comm to
``nostall-wkr-N`` / ``nostall-factory`` and the command line to ``nostall-worker-N`` /
``nostall-factory`` (see ``nostall.workers._procname``). Read from /proc of real processes.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import warnings

import psutil
import pytest
import torch

import nostall
from nostall.workers import _procname

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux process names")


class Numbers(torch.utils.data.Dataset):
    def __len__(self):
        return 32

    def __getitem__(self, i):
        return i


def _proc(pid: int, name: str) -> bytes:
    with open(f"/proc/{pid}/{name}", "rb") as fh:
        return fh.read()


def _assert_named(pid: int, title: str, comm: str) -> None:
    assert _proc(pid, "comm") == comm.encode() + b"\n"
    assert _proc(pid, "cmdline") == title.encode() + b"\0"
    assert psutil.Process(pid).cmdline() == [title]
    ps = subprocess.run(["ps", "-o", "comm=,args=", "-p", str(pid)], capture_output=True, text=True).stdout
    assert ps.split() == [comm, title]


def _announce(started, worker_id: int) -> None:
    """worker_init_fn: runs after the worker named itself; tells the test it started."""
    started.put((worker_id, os.getpid()))


@pytest.mark.timeout(90)
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_workers_and_factory_are_named(method):
    own_cmdline = _proc(os.getpid(), "cmdline")
    ctx = torch.multiprocessing.get_context(method)
    started = ctx.Queue()
    loader = nostall.DataLoader(Numbers(), batch_size=4, num_workers=2, multiprocessing_context=ctx,
                                worker_init_fn=functools.partial(_announce, started))
    try:
        it = iter(loader)
        first = next(it)
        pids = dict(started.get(timeout=30) for _ in range(2))
        for worker_id, pid in pids.items():
            _assert_named(pid, f"nostall-worker-{worker_id}", f"nostall-wkr-{worker_id}")
        # A replacement (forked from the factory, which names itself) is named too.
        os.kill(pids[1], signal.SIGKILL)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # "nostall started a new worker"
            assert torch.cat([first, *it]).tolist() == list(range(32))
            epochs = 0
            while started.empty() and epochs < 5:  # the death is seen when the loader next waits on it
                assert torch.cat(list(loader)).tolist() == list(range(32))
                epochs += 1
        worker_id, new = started.get(timeout=30)
        assert worker_id == 1 and new != pids[1]
        _assert_named(new, "nostall-worker-1", "nostall-wkr-1")
        # The factory that forked it (under fork, started for this replacement).
        _assert_named(loader._engine.pool.factory_pid, "nostall-factory", "nostall-factory")
    finally:
        loader.close()
    assert _proc(os.getpid(), "cmdline") == own_cmdline  # the loader's own process keeps its name
    assert psutil.Process().cmdline() == own_cmdline.decode().split("\0")[:-1]


@pytest.mark.timeout(60)
def test_thread_workers_are_named_threads():
    with nostall.DataLoader(Numbers(), batch_size=4, num_workers=2, worker_type="thread") as loader:
        assert len(list(loader)) == 8
        threads = loader._engine.pool._threads
        for worker_id, thread in threads.items():
            comm = _proc(os.getpid(), f"task/{thread.native_id}/comm")
            assert comm == f"nostall-wkr-{worker_id}\n".encode()
    assert _proc(os.getpid(), "comm") != b"nostall-wkr-0\n"  # the process itself keeps its name


def test_comm_names_fit_linux_limit():
    assert _procname.worker_names(3) == ("nostall-worker-3", "nostall-wkr-3")
    for worker_id in (0, 9, 99, 999, 1000, 99999):
        assert len(_procname.worker_names(worker_id)[1]) <= _procname.COMM_MAX
    assert _procname.worker_names(1234)[1] == "nostall-w-1234"
    assert len("nostall-factory") == _procname.COMM_MAX
