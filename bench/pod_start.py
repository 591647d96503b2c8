"""How long a fleet pod takes from its process start to SERVING, by phase, under the pod's CPU quota.

Starts `sdxl-server serve` as the fleet harness starts a pod of its standard scenario (fleet/run.py's
server_args for fleet/scenarios/standard.yaml: the tiny model at 64x64, 8 steps, 4 slots, queue 32, the
shared compilation cache), in a cgroup (v1 cpu controller) with the scenario's CFS quota where one can be
made (as fleet/pods.py does; else unlimited, and the table says so), polls the gRPC health service until
SERVING, reads the warm-up phases from the pod's log (fleet.pods.warmup_phases, the fleet report's own
reader), and records the process's CPU seconds (/proc/<pid>/stat) at listening and at SERVING. The kubelet's
probe periods are not part of this figure: the chart's `probes` add up to one startup period on top.

One unmeasured start first, so that the compilation cache holds this tree's programs (a pod of a running
fleet finds the programs its predecessors wrote). The machine is shared: run it on a quiet one and
compare labels measured in the same session.

    .venv/bin/python bench/pod_start.py --label after [--starts 4] [--cpu-limit 0.3]

Each label's starts are kept in bench/results/pod_start.json (a label measured again replaces its old
figures) and every label in it is printed side by side: mean seconds per phase, and CPU seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.paths import COMPILE_CACHE, RESULTS_DIR
from fleet.pods import warmup_phases

# fleet/run.py's server_args for the standard scenario (fleet/scenarios/standard.yaml).
POD_ARGS = (
    "--model", "tiny", "--resolutions", "64x64", "--default-steps", "8", "--max-steps", "8",
    "--slots-per-device", "4", "--max-queue", "32",
)  # fmt: skip
CGROUP_CPU_ROOT = Path("/sys/fs/cgroup/cpu")
_CFS_PERIOD_US = 100_000
_POLL_SECONDS = 0.1  # the health poll's period: the figure's resolution
_START_TIMEOUT_SECONDS = 600.0
PHASES = (
    "to_listening", "load", "memory_plan", "trace_and_compile", "schedules", "warm_up",
    "engine_to_serving", "start_to_serving", "cpu_to_listening", "cpu_to_serving",
)  # fmt: skip


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a live process (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _make_cgroup(name: str, cpu_limit: float | None) -> Path | None:
    if cpu_limit is None:
        return None
    cgroup = CGROUP_CPU_ROOT / name
    try:
        cgroup.mkdir(exist_ok=True)
        (cgroup / "cpu.cfs_period_us").write_text(str(_CFS_PERIOD_US))
        (cgroup / "cpu.cfs_quota_us").write_text(str(int(cpu_limit * _CFS_PERIOD_US)))
    except OSError:
        return None
    return cgroup


def _listening_port(log_path: Path, process: subprocess.Popen[bytes]) -> int:
    deadline = time.monotonic() + _START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        for line in log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict) and entry.get("event") == "listening":
                    return int(entry["port"])
        if process.poll() is not None:
            raise RuntimeError(f"the server exited ({process.returncode}); see {log_path}")
        time.sleep(_POLL_SECONDS)
    raise TimeoutError("the server did not listen")


def one_start(cache_dir: Path, cpu_limit: float | None, work: Path, index: int) -> dict[str, float]:
    """Starts a pod, waits for SERVING, stops it; its phases in seconds (and CPU seconds)."""
    log_path = work / f"start-{index}.log"
    cgroup = _make_cgroup(f"sdxl-pod-start-{os.getpid()}-{index}", cpu_limit)
    command = [
        sys.executable, "-m", "sdxl_server.main", "serve", "--host", "127.0.0.1", "--port", "0",
        "--metrics-port", "0", "--log-format", "json", "--compilation-cache-dir", str(cache_dir), *POD_ARGS,
    ]  # fmt: skip

    def enter_cgroup() -> None:  # in the child before exec: the quota covers the interpreter's start too
        if cgroup is not None:
            (cgroup / "cgroup.procs").write_text(str(os.getpid()))

    with open(log_path, "wb") as log:
        started_wall, started = time.time(), time.monotonic()
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=log,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            preexec_fn=enter_cgroup,
        )
    try:
        port = _listening_port(log_path, process)
        cpu_listening = _cpu_seconds(process.pid)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    break
                if process.poll() is not None:
                    raise RuntimeError(f"the server exited ({process.returncode}); see {log_path}")
                time.sleep(_POLL_SECONDS)
        serving = time.monotonic() - started
        cpu_serving = _cpu_seconds(process.pid)
    finally:
        process.terminate()
        process.wait(timeout=60)
        if cgroup is not None:
            with contextlib.suppress(OSError):
                cgroup.rmdir()
    phases = warmup_phases(log_path, [started_wall])
    figures = dict(phases[-1]) if phases else {}
    figures.update(start_to_serving=serving, cpu_to_listening=cpu_listening, cpu_to_serving=cpu_serving)
    return figures


def _mean(starts: list[dict[str, float]], name: str) -> float | None:
    values = [s[name] for s in starts if name in s]
    return statistics.fmean(values) if values else None


def print_table(results: dict[str, Any]) -> None:
    labels = list(results)
    print(f"{'seconds (mean)':<20}" + "".join(f"{label:>16}" for label in labels))
    for name in (*PHASES, "compilation_cache_hits"):
        cells = [_mean(results[label]["starts"], name) for label in labels]
        print(f"{name:<20}" + "".join(f"{'-' if c is None else f'{c:.2f}':>16}" for c in cells))
    print(f"{'starts':<20}" + "".join(f"{len(results[label]['starts']):>16}" for label in labels))
    print(f"{'cpu limit':<20}" + "".join(f"{results[label]['cpu_limit']!s:>16}" for label in labels))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--label", required=True, help="the name these starts are kept under")
    parser.add_argument("--starts", type=int, default=4)
    parser.add_argument("--cpu-limit", type=float, default=0.3, help="CPUs (a CFS quota); 0: unlimited")
    parser.add_argument("--cache-dir", type=Path, default=COMPILE_CACHE)
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / "pod_start.json")
    args = parser.parse_args()
    cpu_limit = args.cpu_limit or None
    with tempfile.TemporaryDirectory(prefix="pod-start-") as work:
        one_start(args.cache_dir, cpu_limit=None, work=Path(work), index=0)  # fills the cache; not counted
        starts = []
        for index in range(1, args.starts + 1):
            figures = one_start(args.cache_dir, cpu_limit, Path(work), index)
            print(json.dumps({"label": args.label, "start": index, **figures}), flush=True)
            starts.append(figures)
    applied = cpu_limit if cpu_limit is None or _make_cgroup_possible() else "none (no cgroup)"
    results = json.loads(args.json.read_text()) if args.json.exists() else {}
    results[args.label] = {
        "starts": starts,
        "cpu_limit": applied,
        "load_average": os.getloadavg()[0],
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1) + "\n")
    print_table(results)
    return 0


def _make_cgroup_possible() -> bool:
    probe = _make_cgroup(f"sdxl-pod-start-{os.getpid()}-probe", 1.0)
    if probe is None:
        return False
    with contextlib.suppress(OSError):
        probe.rmdir()
    return True


if __name__ == "__main__":
    sys.exit(main())
