"""Evidence for error messages: a stuck worker's Python stack, signs of the
out-of-memory killer, and an unguarded main script under spawn.

Stacks: every worker process registers :mod:`faulthandler` on SIGUSR1, writing
to a file named after its pid; the loader sends the signal and reads the file.
faulthandler writes from the signal handler itself, so it works while the
worker is stuck in a C extension or holding the GIL in a tight loop.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

_STACK_SIGNAL = signal.SIGUSR1


def stack_path(pid: int) -> Path:
    """Where worker ``pid`` dumps its stack when asked."""
    return Path(tempfile.gettempdir()) / f"nostall-stack-{pid}.txt"


def install_stack_dump() -> None:
    """In a worker process: dump every thread's stack to :func:`stack_path` on SIGUSR1."""
    path = stack_path(os.getpid())
    try:
        out = open(path, "w")  # noqa: SIM115 - stays open for the handler, closed at exit
    except OSError:
        return  # no writable temp dir: hangs are still reported, without a stack
    faulthandler.register(_STACK_SIGNAL, file=out, all_threads=True)
    # Forked workers end through os._exit: multiprocessing's finalizers run, atexit does not.
    from multiprocessing import util

    util.Finalize(None, _remove_stack_file, args=(path, out), exitpriority=0)


def _remove_stack_file(path: Path, out) -> None:
    faulthandler.unregister(_STACK_SIGNAL)
    out.close()
    path.unlink(missing_ok=True)


def process_stack(pid: int, wait_s: float = 1.0) -> str | None:
    """Ask worker ``pid`` for its Python stack; None if it does not answer in time."""
    path = stack_path(pid)
    try:
        before = path.stat().st_size
        os.kill(pid, _STACK_SIGNAL)
    except OSError:
        return None
    deadline = time.monotonic() + wait_s
    size = before
    while time.monotonic() < deadline:
        time.sleep(0.02)
        try:
            new = path.stat().st_size
        except OSError:
            return None
        if new > before and new == size:  # written, and no longer growing
            break
        size = new
    try:
        text = path.read_text(errors="replace")[before:]
    except OSError:
        return None
    return text.strip() or None


def thread_stack(thread: threading.Thread) -> str | None:
    """The Python stack of a live thread of this process."""
    frame = sys._current_frames().get(thread.ident)
    return "".join(traceback.format_stack(frame)).rstrip() if frame is not None else None


def forget_stack_file(pid: int | None) -> None:
    """Remove the stack file of a worker that is gone (it could not remove it itself)."""
    if pid is not None:
        stack_path(pid).unlink(missing_ok=True)


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
