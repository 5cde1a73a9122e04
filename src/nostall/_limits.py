"""Operating-system limits a loader must fit in: open files and ``/dev/shm``.

Open files: every worker holds a pipe, and every tensor that travels through
shared memory holds a file descriptor while it is alive (torch's default
'file_descriptor' strategy). ``/dev/shm``: batches in flight live there; when it
is too small, writing to a shared tensor kills the worker with SIGBUS ("Bus
error"), so nostall switches to copying batches through the pipe instead.
"""

from __future__ import annotations

import os
import resource

FDS_BASE = 100  # the training process's own files: libraries, dataset files, logs, sockets
FDS_PER_WORKER = 4  # pipes and the process sentinel, per worker


def open_files_needed(num_workers: int, prefetch_factor: int, tensors_per_batch: int) -> int:
    """Estimate of the file descriptors the loader's process needs."""
    in_flight = num_workers * prefetch_factor + 1  # +1: the batch the training loop holds
    return FDS_BASE + FDS_PER_WORKER * num_workers + in_flight * tensors_per_batch


def ensure_open_files(num_workers: int, prefetch_factor: int, tensors_per_batch: int = 2) -> None:
    """Raise the soft open-files limit if the loader may need more (up to the hard
    limit, as `ulimit -n` could); raise an error saying what to do if even that is short."""
    needed = open_files_needed(num_workers, prefetch_factor, tensors_per_batch)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    if hard == resource.RLIM_INFINITY or hard >= needed:
        target = 4 * needed if hard == resource.RLIM_INFINITY else min(hard, 4 * needed)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return
    raise RuntimeError(
        f"the open-files limit is {soft} (hard limit {hard}), and {num_workers} workers with "
        f"prefetch_factor={prefetch_factor} need about {needed} (estimate: {FDS_BASE} for the process, "
        f"{FDS_PER_WORKER} per worker, {tensors_per_batch} per batch in flight). Raise it before "
        f"starting training (`ulimit -n {4 * needed}`; in docker `--ulimit nofile={4 * needed}`), or use "
        "fewer workers or a smaller prefetch_factor."
    )


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
