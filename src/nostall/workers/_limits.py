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

# Descriptors, measured (Python 3.11, torch 2.x, Linux; fork and spawn alike). The
# loader's process holds the factory's control pipe and process sentinel, one socket
# per worker, one more while a worker starts, and, for each shared tensor it takes
# in, the connection to the sending worker's resource sharer and the descriptor
# being received. The factory keeps two pipe ends per worker it forked and each
# later worker inherits those: worker k holds what the loader's process had open
# + 9 + 2k, and per shared tensor it sends its storage's descriptor and a copy that
# waits for the loader. Smallest hard limits that completed with one 280 KB tensor
# per batch (prefetch_factor=2, 5 files open before): 1 worker 17, 4 workers 26,
# 8 workers 33; the estimates below are 18, 26 and 38.
FDS_LOADER = 8  # the loader's process: control pipe, sentinel, a starting worker, receiving a tensor
FDS_PER_WORKER = 1  # the loader's process: each worker's socket
FDS_WORKER = 9  # a worker: its socket, stack file, resource sharer and what it inherited from the factory
FDS_FACTORY_PER_WORKER = 2  # the factory and the last worker: two pipe ends per worker forked
FDS_WORKER_PER_TENSOR = 2  # a worker: a shared tensor's descriptor, and its copy waiting for the loader
FDS_BASE = 100  # a training process's own files, when they cannot be counted (``nostall doctor``)


def open_files_now() -> int:
    """Descriptors this process has open (``FDS_BASE`` where /proc cannot say)."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # less the one listdir holds
    except OSError:
        return FDS_BASE


def open_files_needed(num_workers: int, prefetch_factor: int, tensors_per_batch: int,
                      open_now: int = FDS_BASE) -> int:
    """Estimate of the file descriptors the busiest process of the loader needs (the
    loader's own process, or its last worker), given ``open_now`` open already."""
    in_flight = num_workers * prefetch_factor + 1  # +1: the batch the training loop holds
    loader = open_now + FDS_LOADER + FDS_PER_WORKER * num_workers + in_flight * tensors_per_batch
    worker = (open_now + FDS_WORKER + FDS_FACTORY_PER_WORKER * num_workers
              + FDS_WORKER_PER_TENSOR * tensors_per_batch)
    return max(loader, worker)


def workers_that_fit(limit: int, prefetch_factor: int, tensors_per_batch: int, open_now: int) -> int:
    """The most workers whose estimate fits in ``limit`` open files (0 if none does)."""
    workers = 0
    while open_files_needed(workers + 1, prefetch_factor, tensors_per_batch, open_now) <= limit:
        workers += 1
    return workers


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
    limit, as `ulimit -n` could); raise an error saying what to do, and how many
    workers would fit, if even that is short. The estimate starts from the
    descriptors open now; ``tensors_per_batch`` is a guess made before any batch
    (only tensors above the inline size hold one)."""
    if not _shares_by_descriptor():
        tensors_per_batch = 0
    open_now = open_files_now()
    needed = open_files_needed(num_workers, prefetch_factor, tensors_per_batch, open_now)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    if hard == resource.RLIM_INFINITY or hard >= needed:
        target = 4 * needed if hard == resource.RLIM_INFINITY else min(hard, 4 * needed)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return
    fits = workers_that_fit(hard, prefetch_factor, tensors_per_batch, open_now)
    fewer = (f"use num_workers={fits} (the most that fit)" if fits
             else "use num_workers=0 (no worker fits)")
    if prefetch_factor > 1 and workers_that_fit(hard, 1, tensors_per_batch, open_now) >= num_workers:
        fewer += " or prefetch_factor=1"
    strategy = (f" or change the sharing strategy by calling `{SET_FILE_SYSTEM}` at the beginning of your "
                "code (batches then hold no open file; the estimate becomes "
                f"{open_files_needed(num_workers, prefetch_factor, 0, open_now)})" if tensors_per_batch else "")
    raise RuntimeError(
        f"the open-files limit is {soft} (hard limit {hard}), and {num_workers} workers with "
        f"prefetch_factor={prefetch_factor} need about {needed} (estimate: the {open_now} open now, "
        f"{FDS_LOADER} for the loader, per worker {FDS_PER_WORKER} in this process and "
        f"{FDS_FACTORY_PER_WORKER} in the worker factory, {tensors_per_batch} per batch in flight). Please "
        f"increase the limit before starting training using `ulimit -n {4 * needed}` in the shell (in docker "
        f"`--ulimit nofile={4 * needed}`){strategy}, or {fewer}."
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
