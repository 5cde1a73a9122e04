"""CPUs this process may use: CPU affinity, lowered by a cgroup CPU quota (v2 or v1).

``os.cpu_count()`` reports the machine; a container or a job scheduler usually
allows fewer. ``nostall doctor``, the benchmarks and the tuner count these.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple


def _num(value: float) -> str:
    return f"{value:g}"


class UsableCpus(NamedTuple):
    """How many CPUs this process may use (fractional under a cgroup quota) and why."""

    count: float
    source: str


def parse_cpu_max(text: str) -> float | None:
    """CPUs allowed by a cgroup v2 ``cpu.max`` ("150000 100000" -> 1.5); None for "max ..."."""
    parts = text.split()
    if not parts or parts[0] == "max":
        return None
    period = int(parts[1]) if len(parts) > 1 else 100_000
    return int(parts[0]) / period


def parse_cfs_quota(quota: str, period: str) -> float | None:
    """CPUs allowed by cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``; None for -1."""
    q = int(quota)
    return q / int(period) if q > 0 else None


def _cpu_cgroup_dirs() -> list[tuple[str, Path]]:
    """("v1" | "v2", directory) for this process's CPU cgroup and each ancestor up to the mount.

    A quota on any ancestor also limits this process, so all of them are read.
    """
    try:
        memberships = Path("/proc/self/cgroup").read_text().splitlines()
        mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:  # not Linux, or no /proc: try the usual places
        return [("v2", Path("/sys/fs/cgroup")), ("v1", Path("/sys/fs/cgroup/cpu"))]
    paths: dict[str, str] = {}
    for line in memberships:
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0" and not controllers:
            paths["v2"] = path
        elif "cpu" in controllers.split(","):
            paths["v1"] = path
    out: list[tuple[str, Path]] = []
    for line in mounts:
        fields = line.split()
        if "-" not in fields:
            continue
        dash = fields.index("-")
        fstype = fields[dash + 1]
        options = fields[dash + 3].split(",") if len(fields) > dash + 3 else []
        version = "v2" if fstype == "cgroup2" else "v1" if fstype == "cgroup" and "cpu" in options else None
        if version is None or version not in paths:
            continue
        root, mount = fields[3], Path(fields[4])
        rel = os.path.relpath(paths[version], root)
        # Outside the mount's root (an unusual namespace setup) only the mount itself is readable.
        directory = mount if rel.startswith("..") else Path(os.path.normpath(mount / rel))
        while True:
            out.append((version, directory))
            if directory == mount or directory == directory.parent:
                break
            directory = directory.parent
    return out


def cgroup_cpu_quota() -> tuple[float, str] | None:
    """The lowest cgroup CPU quota over this process's cgroups (v2 or v1) and the file saying so."""
    best: tuple[float, str] | None = None
    for version, directory in _cpu_cgroup_dirs():
        try:
            if version == "v2":
                text = (directory / "cpu.max").read_text().strip()
                limit = parse_cpu_max(text)
                where = f"cgroup v2 {directory / 'cpu.max'} is {text!r}"
            else:
                quota = (directory / "cpu.cfs_quota_us").read_text().strip()
                period = (directory / "cpu.cfs_period_us").read_text().strip()
                limit = parse_cfs_quota(quota, period)
                where = f"cgroup v1 {directory}/cpu.cfs_quota_us / cpu.cfs_period_us is {quota} / {period}"
        except (OSError, ValueError, IndexError):
            continue
        if limit is not None and (best is None or limit < best[0]):
            best = (limit, f"{where} = {_num(limit)} CPUs")
    return best


def usable_cpus() -> UsableCpus:
    """CPUs this process may use: the CPU affinity, lowered by a cgroup CPU quota if any.

    ``count`` is fractional under a fractional quota (e.g. 1.5); ``source`` says
    where the limit comes from, for messages.
    """
    total = os.cpu_count() or 1
    if hasattr(os, "sched_getaffinity"):
        affinity = len(os.sched_getaffinity(0))
        source = f"CPU affinity allows {affinity} of the machine's {total} CPUs"
    else:
        affinity, source = total, f"os.cpu_count() is {total}"
    quota = cgroup_cpu_quota()
    if quota is None:
        return UsableCpus(affinity, source + "; no cgroup CPU quota")
    limit, where = quota
    if limit < affinity:
        return UsableCpus(int(limit) if limit.is_integer() else limit, f"{where} ({source.lower()})")
    return UsableCpus(affinity, f"{source}; the cgroup quota is not lower ({where})")


def local_world_size() -> int:
    """Ranks on this machine: ``LOCAL_WORLD_SIZE`` as torchrun sets it, else 1."""
    try:
        value = int(os.environ["LOCAL_WORLD_SIZE"])
    except (KeyError, ValueError):
        return 1
    return value if value >= 1 else 1


def local_cpu_budget() -> float:
    """CPUs this rank's loader may use: the usable CPUs divided among the ranks on this machine."""
    return usable_cpus().count / local_world_size()
