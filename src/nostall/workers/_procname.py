"""Process names: what ``ps``, ``top`` and the kernel's out-of-memory report call a
nostall process (torch names its workers ``pt_data_worker`` the same way).

Two names, because Linux keeps two:

* ``comm`` (``ps -e``, ``top``, ``/proc/<pid>/comm``, "Killed process 123 (...)" in an
  OOM report) is at most 15 bytes, so ``nostall-worker-3`` (16) does not fit. Workers
  are ``nostall-wkr-N`` (readable, keeps the worker id, fits up to worker 999; beyond,
  ``nostall-w-N``); the factory is ``nostall-factory`` (exactly 15).
* the command line (``ps -o args``, ``top`` with ``c``, ``/proc/<pid>/cmdline``,
  psutil's ``cmdline()``) becomes the full ``nostall-worker-N`` / ``nostall-factory``,
  written over the process's own argv strings, as the ``setproctitle`` package does.
  The kernel reports where they are (``arg_start``/``arg_end`` in ``/proc/self/stat``),
  so nothing is guessed; the area is only written when its bytes read back as the
  command line the kernel reports (otherwise the command line is left as it is). The
  title never outgrows the area (no environment string is moved or overwritten; in
  a shorter area the comm name is written, or nothing), and
  its last byte is set non-zero so every kernel since 2.6 reports the title up to its
  terminating NUL and nothing after it. Python keeps its own copy of the arguments
  (``sys.argv``), so nothing in the process reads the old strings.

Linux only; elsewhere, or when anything is unexpected, names stay unchanged.
"""

from __future__ import annotations

import ctypes

_PR_SET_NAME = 15
COMM_MAX = 15  # bytes of a Linux comm, without its terminating NUL


def worker_names(worker_id: int) -> tuple[str, str]:
    """``(title, comm)`` of worker ``worker_id``."""
    comm = f"nostall-wkr-{worker_id}"
    return f"nostall-worker-{worker_id}", comm if len(comm) <= COMM_MAX else f"nostall-w-{worker_id}"


def set_comm(comm: str) -> bool:
    """Name the calling thread ``comm`` (the process, when called from its main
    thread; ``top -H`` shows a thread's). False where prctl is missing (not Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_NAME, ctypes.c_char_p(comm.encode()[:COMM_MAX]), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def set_process_name(title: str, comm: str) -> None:
    """Name this process: ``comm`` (at most 15 bytes) and the command line ``title``.
    Call it from the main thread while it is the only one: threads started
    afterwards inherit the comm."""
    if not set_comm(comm):
        return
    try:
        _set_cmdline(title.encode(), comm.encode())
    except (OSError, ValueError, IndexError):
        pass  # no /proc, or a layout we do not recognise: the command line stays


def _set_cmdline(title: bytes, short: bytes) -> None:
    with open("/proc/self/stat", "rb") as fh:
        stat = fh.read()
    # Fields after the command name, which may hold spaces and parentheses: the last ")" ends it.
    fields = stat[stat.rindex(b")") + 2:].split()
    arg_start, arg_end = int(fields[45]), int(fields[46])  # fields 48 and 49 of proc(5)
    size = arg_end - arg_start
    if not 0 < size <= 1 << 20:
        return  # nonsense
    if len(title) + 2 > size:  # the title, its NUL and the marker byte must fit
        title = short  # e.g. `python x.py`: 12 bytes
        if len(title) + 2 > size:
            return
    with open("/proc/self/cmdline", "rb") as fh:
        reported = fh.read()
    if not reported or ctypes.string_at(arg_start, len(reported)) != reported:
        return  # the kernel's numbers do not point at the command line it reports
    area = title + b"\0" * (size - len(title) - 1) + b"."
    ctypes.memmove(arg_start, area, size)
