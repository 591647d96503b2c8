"""The CPUs this process may use: its cgroup's CFS quota (a container's ``resources.limits.cpu``).

Read from the process's own cgroup, and every cgroup above it (the tightest quota wins): cgroup v2's
``cpu.max`` (``"30000 100000"``, or ``"max 100000"`` for none), cgroup v1's ``cpu.cfs_quota_us`` /
``cpu.cfs_period_us`` (-1 for none). In a container with its own cgroup namespace the process's cgroup is
``/``, the container's; the fleet harness moves each pod's process into a v1 cgroup of its own after it
started, so callers read this again rather than once at start.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


def cpu_limit(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> float | None:
    """CPUs the process's cgroups allow (0.3 for a 300m limit), or None where no quota applies or none
    can be read."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    limits: list[float] = []
    for line in lines:
        if line.count(":") < 2:
            continue
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2's unified hierarchy
            limits += _along(Path(root), path, _v2_limit)
        elif "cpu" in controllers.split(","):
            limits += _along(Path(root) / controllers, path, _v1_limit)
    return min(limits) if limits else None


def _along(mount: Path, path: str, read: Callable[[Path], float | None]) -> list[float]:
    """The limits of the cgroup at ``path`` under ``mount`` and of each one above it."""
    found = []
    parts = [p for p in path.split("/") if p]
    for depth in range(len(parts), -1, -1):
        limit = read(mount.joinpath(*parts[:depth]))
        if limit is not None:
            found.append(limit)
    return found


def _v2_limit(cgroup: Path) -> float | None:
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()
    except (OSError, ValueError):
        return None
    if quota == "max" or float(period) <= 0:
        return None
    return float(quota) / float(period)


def _v1_limit(cgroup: Path) -> float | None:
    try:
        quota = float((cgroup / "cpu.cfs_quota_us").read_text())
        period = float((cgroup / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    if quota <= 0 or period <= 0:
        return None
    return quota / period
