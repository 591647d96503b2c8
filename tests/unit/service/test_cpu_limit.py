"""The CPUs a process's cgroups allow (service/cpu_limit.py), read from cgroup trees written in tmp_path
as the kernel lays them out: v2's cpu.max, v1's CFS quota and period; the tightest of the process's
cgroup and those above it."""

from __future__ import annotations

from pathlib import Path

import pytest
from sdxl_server.service.cpu_limit import cpu_limit


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_quota_of_the_process_or_above_it(tmp_path: Path) -> None:
    proc = tmp_path / "cgroup"
    _write(proc, "0::/kubepods/pod1/ctr\n")
    _write(tmp_path / "fs/kubepods/pod1/ctr/cpu.max", "max 100000\n")
    _write(tmp_path / "fs/kubepods/pod1/cpu.max", "30000 100000\n")  # the pod's 300m
    _write(tmp_path / "fs/kubepods/cpu.max", "400000 100000\n")
    assert cpu_limit(str(proc), str(tmp_path / "fs")) == pytest.approx(0.3)


def test_a_container_with_its_own_cgroup_namespace_reads_the_root(tmp_path: Path) -> None:
    proc = tmp_path / "cgroup"
    _write(proc, "0::/\n")
    _write(tmp_path / "fs/cpu.max", "250000 100000\n")
    assert cpu_limit(str(proc), str(tmp_path / "fs")) == pytest.approx(2.5)


def test_cgroup_v1_cfs_quota(tmp_path: Path) -> None:
    # As the fleet harness makes a pod's: a v1 cpu cgroup under the run's, quota -1 at the top.
    proc = tmp_path / "cgroup"
    _write(proc, "4:memory:/x\n2:cpu,cpuacct:/fleet/pod-1\n0::/\n")
    _write(tmp_path / "fs/cpu,cpuacct/cpu.cfs_quota_us", "-1\n")
    _write(tmp_path / "fs/cpu,cpuacct/cpu.cfs_period_us", "100000\n")
    _write(tmp_path / "fs/cpu,cpuacct/fleet/pod-1/cpu.cfs_quota_us", "50000\n")
    _write(tmp_path / "fs/cpu,cpuacct/fleet/pod-1/cpu.cfs_period_us", "100000\n")
    assert cpu_limit(str(proc), str(tmp_path / "fs")) == pytest.approx(0.5)


def test_no_quota_or_nothing_readable_is_none(tmp_path: Path) -> None:
    proc = tmp_path / "cgroup"
    _write(proc, "0::/ctr\n")
    _write(tmp_path / "fs/ctr/cpu.max", "max 100000\n")
    assert cpu_limit(str(proc), str(tmp_path / "fs")) is None
    assert cpu_limit(str(tmp_path / "absent"), str(tmp_path / "fs")) is None
