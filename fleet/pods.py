"""Pods as `sdxl-server serve` processes, each on its own loopback address with the same ports (a /24 of
127.0.0.0/8 chosen per run, so that two runs on one machine never answer each other's scrapes), going
through the lifecycle a Deployment's pod goes through, with the chart's timings:

- **Pending** for the provisioning delay (a TPU node to create, the image to pull), then the container
  starts: **Running**, not ready. Its CPU is limited like a container's ``resources.limits.cpu``: a
  cgroup's CFS quota, where the machine lets us create one (else unlimited, and the report says so).
- The **startup probe** (gRPC health ``""``) runs every ``startup_period`` until it passes; then the
  **readiness probe** (``sdxl.v1.ImageService``) every ``readiness_period``: ready after one success,
  unready after ``failure_threshold`` failures in a row. Ready pods are the headless Service's
  endpoints (DNS); every running pod is scraped (a PodMonitoring selects pods, not endpoints).
- **Deletion** (scale-down), as the kubelet does it: the pod leaves the endpoints at once, then the
  preStop sleep, then SIGTERM (the server drains), then SIGKILL if it outlives the termination grace.
- **A killed container** (the chaos test's SIGKILL) makes the pod unready at once (the kubelet sees the
  container die); it is restarted in place (same address, ``restartPolicy: Always``) and warms up again.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import os
import random
import re
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fleet.replica_calculator import PodInfo, PodPhase

GRPC_PORT = 50051
METRICS_PORT = 8000
IMAGE_SERVICE = "sdxl.v1.ImageService"
CGROUP_CPU_ROOT = Path("/sys/fs/cgroup/cpu")
_CFS_PERIOD_US = 100_000


@dataclass(frozen=True)
class PodSettings:
    """How every pod runs (the scenario's `pod` section and the chart's timings, time-compressed)."""

    server_args: tuple[str, ...]
    cpu_limit: float | None
    provisioning_delay: float
    startup_period: float
    readiness_period: float
    readiness_failure_threshold: int
    pre_stop_sleep: float
    termination_grace: float
    # The shared cache (a GCS bucket or RWX claim in the chart), or None: each pod gets its own empty
    # directory under log_dir, as an emptyDir volume (it survives a container restart, not the pod).
    shared_compilation_cache: Path | None = None
    probe_timeout: float = 1.0
    log_dir: Path = Path(".")


@dataclass
class PodRecord:
    """What happened to one pod, in seconds since the run started (for the report)."""

    name: str
    address: str
    created: float
    started: list[float] = field(default_factory=list)
    serving: list[float] = field(default_factory=list)
    ready: list[float] = field(default_factory=list)
    unready: list[float] = field(default_factory=list)
    deleted: float | None = None
    sigterm: float | None = None
    exited: list[tuple[float, int]] = field(default_factory=list)
    killed: list[float] = field(default_factory=list)
    on_spare_node: bool = False  # started on a node the chart's headroom kept: no provisioning delay
    started_wall: list[float] = field(default_factory=list)  # time.time() of each start, to read the log
    # Each container start's warm-up, in seconds by phase (warmup_phases below), read from its log.
    warmups: list[dict[str, float]] = field(default_factory=list)

    def read_warmups(self, log_dir: Path) -> None:
        self.warmups = warmup_phases(log_dir / f"{self.name}.log", self.started_wall)


class Pod:
    def __init__(
        self,
        index: int,
        address: str,
        settings: PodSettings,
        clock: Callable[[], float],
        events: PodEvents,
        on_spare_node: bool = False,
    ) -> None:
        self.name = f"sdxl-serve-{index}"
        self.address = address
        self.settings = settings
        self.phase = PodPhase.PENDING
        self.ready = False
        self.being_deleted = False
        self.record = PodRecord(self.name, self.address, clock(), on_spare_node=on_spare_node)
        self._clock = clock
        self._events = events
        self._process: asyncio.subprocess.Process | None = None
        self._task = asyncio.ensure_future(self._run())
        self._cgroup: Path | None = None

    @property
    def metrics_address(self) -> str:
        return f"{self.address}:{METRICS_PORT}"

    def info(self) -> PodInfo:
        return PodInfo(self.name, self.phase, self.ready, self.being_deleted)

    def delete(self) -> None:
        """Starts the graceful deletion (returns at once; the pod leaves when its process is gone)."""
        if self.being_deleted:
            return
        self.being_deleted = True
        self.record.deleted = self._clock()
        self._set_ready(False)

    def kill(self) -> None:
        """SIGKILLs the container (chaos); the pod restarts it."""
        if self._process is not None and self._process.returncode is None:
            self.record.killed.append(self._clock())
            self._process.kill()

    async def wait_gone(self) -> None:
        await self._task

    def _set_ready(self, ready: bool) -> None:
        if ready == self.ready:
            return
        self.ready = ready
        (self.record.ready if ready else self.record.unready).append(self._clock())
        self._events.endpoints_changed()

    async def _run(self) -> None:
        try:
            if not self.record.on_spare_node:
                await self._sleep_unless_deleted(self.settings.provisioning_delay)
            restarts = 0
            while not self.being_deleted:
                await self._run_container()
                # The kubelet restarts a dead container at once the first time, then backs off 10 s, 20 s...
                await self._sleep_unless_deleted(
                    0.0 if restarts == 0 else min(300.0, 10.0 * 2 ** (restarts - 1))
                )
                restarts += 1
        finally:
            self.phase = PodPhase.SUCCEEDED
            self._remove_cgroup()
            self._events.pod_gone(self)

    async def _sleep_unless_deleted(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self.being_deleted and time.monotonic() < end:
            await asyncio.sleep(min(0.1, end - time.monotonic()))

    async def _run_container(self) -> None:
        log = open(self.settings.log_dir / f"{self.name}.log", "ab")  # noqa: SIM115 - closed below
        self._process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "sdxl_server.main",
            "serve",
            "--host",
            self.address,
            "--port",
            str(GRPC_PORT),
            "--metrics-port",
            str(METRICS_PORT),
            "--compilation-cache-dir",
            str(self._compilation_cache()),
            *self.settings.server_args,
            stdout=log,
            stderr=log,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self._limit_cpu(self._process.pid)
        self.phase = PodPhase.RUNNING
        self.record.started.append(self._clock())
        self.record.started_wall.append(time.time())
        self._events.targets_changed()
        probes = asyncio.ensure_future(self._probe())
        termination = asyncio.ensure_future(self._terminate_when_deleted())
        code = await self._process.wait()
        self.record.exited.append((self._clock(), code))
        probes.cancel()
        termination.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await probes
        with contextlib.suppress(asyncio.CancelledError):
            await termination
        log.close()
        self._set_ready(False)
        self._events.targets_changed()

    def _compilation_cache(self) -> Path:
        if self.settings.shared_compilation_cache is not None:
            return self.settings.shared_compilation_cache
        own = self.settings.log_dir / f"{self.name}-compilation-cache"
        own.mkdir(exist_ok=True)
        return own

    async def _probe(self) -> None:
        """The kubelet's startup probe, then its readiness probe, both gRPC health checks."""
        async with grpc.aio.insecure_channel(f"{self.address}:{GRPC_PORT}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while not await self._check(health, ""):
                await asyncio.sleep(self.settings.startup_period)
            self.record.serving.append(self._clock())
            failures = 0
            while True:
                if await self._check(health, IMAGE_SERVICE):
                    failures = 0
                    if not self.being_deleted:
                        self._set_ready(True)
                else:
                    failures += 1
                    if failures >= self.settings.readiness_failure_threshold:
                        self._set_ready(False)
                await asyncio.sleep(self.settings.readiness_period)

    async def _check(self, health: health_pb2_grpc.HealthStub, service: str) -> bool:
        try:
            response = await health.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=self.settings.probe_timeout
            )
        except grpc.aio.AioRpcError:
            return False
        return bool(response.status == health_pb2.HealthCheckResponse.SERVING)

    async def _terminate_when_deleted(self) -> None:
        while not self.being_deleted:
            await asyncio.sleep(0.05)
        process = self._process
        assert process is not None
        await asyncio.sleep(self.settings.pre_stop_sleep)  # the preStop hook
        grace_left = self.settings.termination_grace - self.settings.pre_stop_sleep
        if process.returncode is None:
            self.record.sigterm = self._clock()
            process.send_signal(signal.SIGTERM)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(process.wait(), max(0.0, grace_left))
        if process.returncode is None:
            process.kill()

    def _limit_cpu(self, pid: int) -> None:
        if self.settings.cpu_limit is None or self._events.cgroup_parent is None:
            return
        cgroup = self._events.cgroup_parent / self.name
        try:
            cgroup.mkdir(exist_ok=True)
            (cgroup / "cpu.cfs_period_us").write_text(str(_CFS_PERIOD_US))
            (cgroup / "cpu.cfs_quota_us").write_text(str(int(self.settings.cpu_limit * _CFS_PERIOD_US)))
            (cgroup / "cgroup.procs").write_text(str(pid))
            self._cgroup = cgroup
        except OSError:
            self._events.cgroup_failed()

    def _remove_cgroup(self) -> None:
        if self._cgroup is not None:
            with contextlib.suppress(OSError):
                self._cgroup.rmdir()


# "engine ready: 4 slots on 1 devices in 12.3s (load 1.2s, memory_plan 0.4s, trace_and_compile 9.1s, ...); 9
# programs ... built in 9.1s, 9 compilation cache hits": the engine's start by phase (jax_engine.start).
_ENGINE_READY = re.compile(
    r"engine ready: .* in [\d.]+s \((?P<phases>[^)]*)\).* (?P<hits>\d+) compilation cache hits"
)
_PHASE = re.compile(r"(?P<name>[a-z_]+) (?P<seconds>[\d.]+)s")


def warmup_phases(log_path: Path, started_wall: list[float]) -> list[dict[str, float]]:
    """Each container start's warm-up from its log, in seconds: ``to_listening`` (the interpreter, the
    imports, the gRPC and metrics servers bound), the engine's own phases (``load``, ``memory_plan``,
    ``trace_and_compile``, ``schedules``, ``warm_up``), ``engine_to_serving`` (the health service set
    SERVING) and the compilation cache hits (programs loaded instead of compiled)."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    found: list[dict[str, float]] = []
    current: dict[str, float] | None = None
    engine_ready_at = 0.0
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if not isinstance(entry, dict) or "time" not in entry:
            continue
        at = datetime.datetime.fromisoformat(entry["time"]).timestamp()
        if entry.get("event") == "listening":
            start = max((w for w in started_wall if w <= at), default=at)
            current = {"to_listening": at - start}
            found.append(current)
        elif current is not None and (match := _ENGINE_READY.search(str(entry.get("message", "")))):
            for phase in _PHASE.finditer(match.group("phases")):
                current[phase.group("name")] = float(phase.group("seconds"))
            current["compilation_cache_hits"] = float(match.group("hits"))
            engine_ready_at = at
        elif current is not None and entry.get("event") == "ready" and engine_ready_at:
            current["engine_to_serving"] = max(0.0, at - engine_ready_at)
    return found


class PodEvents:
    """What the fleet needs to hear from its pods (implemented by Fleet)."""

    cgroup_parent: Path | None = None

    def endpoints_changed(self) -> None: ...
    def targets_changed(self) -> None: ...
    def pod_gone(self, pod: Pod) -> None: ...
    def cgroup_failed(self) -> None: ...


def loopback_block() -> str:
    """A /24 of the loopback network for one run's pods (``127.a.b``, a pod of index i at ``.i+1``), chosen at
    random among 65,024 and checked free: nothing answers on its first pod's ports. Every Linux loopback
    address in 127.0.0.0/8 reaches this machine with no setup; 127.0.0.x is left to the tools (Prometheus,
    dnsmasq, the client tests' fixed servers)."""
    rng = random.SystemRandom()
    for _ in range(32):
        block = f"127.{rng.randint(1, 254)}.{rng.randint(0, 255)}"
        if not any(_answers(f"{block}.3", port) for port in (GRPC_PORT, METRICS_PORT)):
            return block
    raise RuntimeError("no free loopback block for the pods (32 random /24s of 127.0.0.0/8 all answered)")


def _answers(address: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex((address, port)) == 0


def make_cgroup_parent(run_name: str) -> Path | None:
    """A cgroup (v1 cpu controller) the pods' own cgroups go under, or None where none can be made."""
    parent = CGROUP_CPU_ROOT / f"sdxl-fleet-{run_name}"
    try:
        parent.mkdir(exist_ok=True)
        return parent
    except OSError:
        return None


def remove_cgroup_parent(parent: Path | None) -> None:
    if parent is not None:
        with contextlib.suppress(OSError):
            parent.rmdir()
