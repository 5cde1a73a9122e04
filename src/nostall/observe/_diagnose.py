"""Evidence for error messages: a stuck worker's Python stack, signs of the
out-of-memory killer, and an unguarded main script under spawn.

Stacks: every worker process registers :mod:`faulthandler` on SIGUSR1, writing
to an anonymous in-memory file; the loader sends the signal and reads that file
through ``/proc/<pid>/fd``.
faulthandler writes from the signal handler itself, so it works while the
worker is stuck in a C extension or holding the GIL in a tight loop.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

_STACK_SIGNAL = signal.SIGUSR1


_STACK_NAME = "nostall-stack"  # the memfd's name, as /proc/<pid>/fd shows it: "/memfd:nostall-stack (deleted)"


def install_stack_dump() -> None:
    """In a worker process: dump every thread's stack on SIGUSR1 into an anonymous
    in-memory file (``memfd_create``) that the loader reads through ``/proc/<pid>/fd``.

    The file has no name in any directory, so there is nothing to plant a symlink at
    and nothing to remove: the kernel frees it with the process however it ends
    (closed loader, SIGKILL, a killed main process). Only processes allowed to trace
    the worker (its own user) can open it through /proc.
    """
    try:
        fd = os.memfd_create(_STACK_NAME, os.MFD_CLOEXEC)
        os.fchmod(fd, 0o600)
    except (OSError, AttributeError):
        return  # no memfd (very old kernel, seccomp): hangs are still reported, without a stack
    faulthandler.register(_STACK_SIGNAL, file=fd, all_threads=True)


def _stack_file(pid: int) -> str | None:
    """``/proc/<pid>/fd/<n>`` of worker ``pid``'s stack file, if it has one."""
    fds = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fds)
    except OSError:
        return None
    for name in names:
        try:
            if os.readlink(f"{fds}/{name}").startswith(f"/memfd:{_STACK_NAME} "):
                return f"{fds}/{name}"
        except OSError:
            continue  # closed meanwhile
    return None


def process_stack(pid: int, wait_s: float = 1.0) -> str | None:
    """Ask worker ``pid`` for its Python stack; None if it does not answer in time."""
    path = _stack_file(pid)
    if path is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # a new open of the worker's memfd
    except OSError:
        return None
    try:
        before = size = os.fstat(fd).st_size
        os.kill(pid, _STACK_SIGNAL)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            time.sleep(0.02)
            new = os.fstat(fd).st_size
            if new > before and new == size:  # written, and no longer growing
                break
            size = new
        text = os.pread(fd, max(0, os.fstat(fd).st_size - before), before).decode(errors="replace")
    except OSError:
        return None
    finally:
        os.close(fd)
    return text.strip() or None


def thread_stack(thread: threading.Thread) -> str | None:
    """The Python stack of a live thread of this process."""
    frame = sys._current_frames().get(thread.ident)
    return "".join(traceback.format_stack(frame)).rstrip() if frame is not None else None


# -- out of memory ----------------------------------------------------------------
def _memory_cgroup_dir() -> Path | None:
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            hierarchy, controllers, path = line.split(":", 2)
            if hierarchy == "0" and not controllers:
                return Path("/sys/fs/cgroup") / path.lstrip("/")
    except OSError:
        pass
    return None


def oom_kills() -> int | None:
    """The cgroup's count of processes killed by the OOM killer (cgroup v2), if readable."""
    directory = _memory_cgroup_dir()
    if directory is None:
        return None
    try:
        for line in (directory / "memory.events").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
    except (OSError, ValueError):
        pass
    return None


def oom_evidence(kills_before: int | None) -> str:
    """What the cgroup says about memory, for a worker killed by SIGKILL."""
    kills = oom_kills()
    directory = _memory_cgroup_dir()
    limit = ""
    if directory is not None:
        try:
            value = (directory / "memory.max").read_text().strip()
            limit = "no memory limit" if value == "max" else f"memory.max {int(value) / 2**20:,.0f} MB"
        except (OSError, ValueError):
            pass
    if kills is not None and kills_before is not None and kills > kills_before:
        return (f"Likely cause: out of memory. The cgroup's OOM killer killed {kills - kills_before} "
                f"process(es) since the workers started (memory.events oom_kill {kills_before} -> {kills}"
                + (f"; {limit}" if limit else "") + "). Use fewer workers, a smaller prefetch_factor "
                "or batch size, or more memory.")
    return ("SIGKILL usually comes from the out-of-memory killer (check `dmesg` and the memory limit"
            + (f": {limit}" if limit else "") + ") or from someone running `kill -9`.")


# -- the main script under spawn ------------------------------------------------------
def in_spawned_bootstrap() -> bool:
    """True while a spawn or forkserver child re-imports the main script."""
    import multiprocessing.process

    return bool(getattr(multiprocessing.process.current_process(), "_inheriting", False))


def unguarded_main_lines() -> str | None:
    """Which lines of the main script use a DataLoader outside the ``__main__`` guard."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if not path or not path.endswith(".py"):
        return None
    try:
        from ._script import unguarded_uses

        starts, creates = unguarded_uses(path)
    except (OSError, ValueError, SyntaxError):
        return None
    listed = "; ".join(text for _, text in sorted(starts + creates))
    return f"{Path(path).name}: {listed}" if listed else None


GUARD_FIX = ('Put the training code in a function and call it under the guard:\n'
             '    if __name__ == "__main__":\n'
             '        main()\n'
             'or use multiprocessing_context="fork" (Linux).')
