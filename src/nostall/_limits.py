"""Operating-system limits a loader must fit in: open files and ``/dev/shm``.

Open files: every worker holds a pipe, and every tensor that travels through
shared memory holds a file descriptor while it is alive (torch's default
'file_descriptor' strategy). ``/dev/shm``: batches in flight live there; when it
is too small, writing to a shared tensor kills the worker with SIGBUS ("Bus
error"), so nostall switches to copying batches through the pipe instead.
"""

from __future__ import annotations

import errno
import os
import re
import resource

FDS_BASE = 100  # the training process's own files: libraries, dataset files, logs, sockets
FDS_PER_WORKER = 4  # pipes and the process sentinel, per worker


def open_files_needed(num_workers: int, prefetch_factor: int, tensors_per_batch: int) -> int:
    """Estimate of the file descriptors the loader's process needs."""
    in_flight = num_workers * prefetch_factor + 1  # +1: the batch the training loop holds
    return FDS_BASE + FDS_PER_WORKER * num_workers + in_flight * tensors_per_batch


# torch's words for running out of open files while loading (dataloader.py); nostall's
# errors start with them so that code and log alerts written for torch match.
TORCH_TOO_MANY_FILES = (
    "Too many open files. Communication with the workers is no longer possible. Please increase the "
    "limit using `ulimit -n` in the shell or change the sharing strategy by calling "
    "`torch.multiprocessing.set_sharing_strategy('file_system')` at the beginning of your code"
)
SET_FILE_SYSTEM = "torch.multiprocessing.set_sharing_strategy('file_system')"


def _shares_by_descriptor() -> bool:
    """Whether shared tensors hold an open file in the receiving process (torch's default
    'file_descriptor' strategy; 'file_system' passes file names instead)."""
    import torch.multiprocessing

    return torch.multiprocessing.get_sharing_strategy() != "file_system"


def ensure_open_files(num_workers: int, prefetch_factor: int, tensors_per_batch: int = 2) -> None:
    """Raise the soft open-files limit if the loader may need more (up to the hard
    limit, as `ulimit -n` could); raise an error saying what to do if even that is short."""
    if not _shares_by_descriptor():
        tensors_per_batch = 0
    needed = open_files_needed(num_workers, prefetch_factor, tensors_per_batch)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    if hard == resource.RLIM_INFINITY or hard >= needed:
        target = 4 * needed if hard == resource.RLIM_INFINITY else min(hard, 4 * needed)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return
    strategy = (f" or change the sharing strategy by calling `{SET_FILE_SYSTEM}` at the beginning of your "
                "code (batches then hold no open file; the estimate becomes "
                f"{open_files_needed(num_workers, prefetch_factor, 0)})" if tensors_per_batch else "")
    raise RuntimeError(
        f"the open-files limit is {soft} (hard limit {hard}), and {num_workers} workers with "
        f"prefetch_factor={prefetch_factor} need about {needed} (estimate: {FDS_BASE} for the process, "
        f"{FDS_PER_WORKER} per worker, {tensors_per_batch} per batch in flight). Please increase the limit "
        f"before starting training using `ulimit -n {4 * needed}` in the shell (in docker "
        f"`--ulimit nofile={4 * needed}`){strategy}, or use fewer workers or a smaller prefetch_factor."
    )


def out_of_open_files(exc: BaseException) -> bool:
    """Whether ``exc``, raised while receiving a batch, means this process ran out of
    open files (a file descriptor passed with a shared tensor is then dropped, which
    multiprocessing reports as "received 0 items of ancdata")."""
    if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
        return True
    text = str(exc)
    return ("ancdata" in text or "Too many open files" in text) and _at_open_files_limit()


def _at_open_files_limit(margin: int = 10) -> bool:
    """As torch checks: can this process still open ``margin`` files?"""
    fds = []
    try:
        for _ in range(margin):
            fds.append(os.open(os.devnull, os.O_RDONLY))
    except OSError as exc:
        return exc.errno in (errno.EMFILE, errno.ENFILE)
    finally:
        for fd in fds:
            os.close(fd)
    return False


def too_many_open_files_text(inline_bytes: int) -> str:
    """The error when this process ran out of open files while receiving batches:
    torch's sentence, then what holds the files and what to do."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        count = f"has {len(os.listdir('/proc/self/fd')) - 1} files open"
    except OSError:
        count = "has as many files open as it may"
    return (f"{TORCH_TOO_MANY_FILES}. nostall: this process {count} and its limit is {soft} (hard limit "
            f"{hard}). Every tensor larger than {inline_bytes // 1024} KB in a batch comes through shared "
            "memory and holds one open file for as long as it is alive (torch's 'file_descriptor' "
            "sharing strategy), so a loop that keeps batches (in a list, a metrics buffer) runs out. "
            "Keep copies (`t.clone()`) or plain numbers instead, or apply one of the fixes above. "
            "The loader was closed.")


def shm_free_bytes() -> int | None:
    """Free bytes in /dev/shm (None where there is none to measure)."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def shm_size_bytes() -> int | None:
    """Total bytes of /dev/shm."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return None
    return st.f_blocks * st.f_frsize


def remove_stranded_shm(pid: int | None) -> int:
    """Delete the shared-memory files a dead worker ``pid`` was still creating.

    torch names them ``/dev/shm/torch_<pid>_...`` and unlinks each right after
    creating it; a worker killed in between leaves one behind for good. Once the
    worker is gone nobody can open it any more, so removing it frees its memory.
    """
    if pid is None:
        return 0
    removed = 0
    try:
        names = os.listdir("/dev/shm")
    except OSError:
        return 0
    prefix = f"torch_{pid}_"
    for name in names:
        if name.startswith(prefix):
            try:
                os.unlink(os.path.join("/dev/shm", name))
                removed += 1
            except OSError:
                pass
    return removed


_FAILED_SHM = re.compile(r"for file <(/torch_(\d+)_[^/<>]+)>")


def remove_failed_shm(error: BaseException) -> bool:
    """Delete the /dev/shm file this process was making when ``error`` said there was
    no room for it.

    torch creates ``/dev/shm/torch_<pid>_...``, then reserves its size, and unlinks it
    only once that worked: when /dev/shm is full it raises "unable to allocate shared
    memory(shm) for file </torch_...>: No space left on device" and leaves the empty
    file behind for good. Only a file of this process (its pid in the name) is removed.
    """
    match = _FAILED_SHM.search(str(error))
    if match is None or int(match.group(2)) != os.getpid():
        return False
    try:
        os.unlink("/dev/shm" + match.group(1))
    except OSError:
        return False
    return True
