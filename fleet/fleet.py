"""The Deployment and the HPA controller: pods made and removed as the ported algorithm decides.

``Fleet`` is what the Deployment, its ReplicaSet and the endpoints controller do: keep ``replicas``
pods, choose which pods a scale-down removes (ReplicaSet's ranking: not yet running first, then not
ready, then the most recently ready), publish the ready pods to DNS and the running pods to Prometheus.
``Autoscaler`` is the HPA controller's loop: every sync period it reads the metric from Prometheus the
way the chart's adapter would, runs the replica calculator and ``HorizontalController.reconcile``, and
sets the Fleet's replicas. Both record a timeline for the report.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fleet.chart import HpaSpec, series_name
from fleet.dns import Dns
from fleet.horizontal import HorizontalController
from fleet.pods import GRPC_PORT, Pod, PodEvents, PodSettings, loopback_block
from fleet.prometheus import Prometheus, external_metric_query, pods_metric_query, to_milli
from fleet.replica_calculator import (
    MetricsUnavailable,
    PodPhase,
    get_external_per_pod_metric_replicas,
    get_metric_replicas,
)

LOAD_METRIC = "sdxl_load"
DEMAND_METRIC = "sdxl_demand"


class Fleet(PodEvents):
    def __init__(
        self,
        settings: PodSettings,
        dns: Dns,
        prometheus: Prometheus,
        clock: Callable[[], float],
        cgroup_parent: Path | None,
        spare_nodes: int = 0,
        address_block: str | None = None,
    ) -> None:
        """``spare_nodes``: nodes the chart keeps provisioned and empty (its headroom placeholders or
        CapacityBuffer); a new pod that takes one starts at once, and the cluster provisions a replacement
        (the provisioning delay) for the next. ``address_block``: the pods' ``127.a.b`` (pods.loopback_block
        by default, one per run)."""
        self.settings = settings
        self.spare_nodes = spare_nodes
        self.spares_ready = spare_nodes
        self.spare_taken: list[float] = []  # when a new pod skipped provisioning on a spare node
        self.dns = dns
        self.prometheus = prometheus
        self.clock = clock
        self.cgroup_parent = cgroup_parent
        self.cpu_limit_applied = cgroup_parent is not None and settings.cpu_limit is not None
        self.replicas = 0
        self.pods: list[Pod] = []  # every pod not yet gone, deleting ones included
        self.gone: list[Pod] = []
        self.address_block = address_block or loopback_block()
        self._next_index = 1  # the first pod is index 2, at <block>.3

    # --- the Deployment -----------------------------------------------------------------------------

    def scale(self, replicas: int) -> None:
        self.replicas = replicas
        active = [p for p in self.pods if not p.being_deleted]
        for _ in range(replicas - len(active)):
            self._next_index += 1
            if self._next_index > 254:
                raise RuntimeError("out of loopback addresses for pods")
            address = f"{self.address_block}.{self._next_index + 1}"
            self.pods.append(
                Pod(self._next_index, address, self.settings, self.clock, self, self._take_spare())
            )
        for pod in sorted(active, key=_deletion_rank)[: max(0, len(active) - replicas)]:
            pod.delete()

    def _take_spare(self) -> bool:
        """Whether the next pod lands on a spare node; if so, a replacement starts provisioning."""
        if self.spares_ready <= 0:
            return False
        self.spares_ready -= 1
        self.spare_taken.append(self.clock())
        asyncio.get_running_loop().call_later(self.settings.provisioning_delay, self._spare_provisioned)
        return True

    def _spare_provisioned(self) -> None:
        self.spares_ready = min(self.spare_nodes, self.spares_ready + 1)

    def active(self) -> list[Pod]:
        return [p for p in self.pods if not p.being_deleted]

    def ready(self) -> list[Pod]:
        return [p for p in self.pods if p.ready and not p.being_deleted]

    async def wait_all_gone(self) -> None:
        for pod in list(self.pods):
            pod.delete()
        await asyncio.gather(*(p.wait_gone() for p in list(self.pods)))

    # --- PodEvents ------------------------------------------------------------------------------------

    def endpoints_changed(self) -> None:
        self.dns.set_addresses([p.address for p in self.ready()])

    def targets_changed(self) -> None:
        self.prometheus.set_targets(
            {p.name: p.metrics_address for p in self.pods if p.phase == PodPhase.RUNNING}
        )

    def pod_gone(self, pod: Pod) -> None:
        if pod in self.pods:
            self.pods.remove(pod)
            self.gone.append(pod)
        self.targets_changed()
        self.endpoints_changed()

    def cgroup_failed(self) -> None:
        self.cpu_limit_applied = False


def _deletion_rank(pod: Pod) -> tuple[int, int, float, float]:
    """ReplicaSet's ``ActivePodsWithRanks`` order, the first deleted first: pending before running,
    unready before ready, then the pod ready for the shortest time, then the newest."""
    phase_rank = 0 if pod.phase == PodPhase.PENDING else 1
    ready_since = pod.record.ready[-1] if pod.ready and pod.record.ready else float("inf")
    return (phase_rank, 1 if pod.ready else 0, -ready_since, -pod.record.created)


@dataclass
class SyncRecord:
    t: float
    current_replicas: int
    proposal: int | None
    desired_replicas: int
    usage_milli: int | None
    reason: str
    ready: int


@dataclass
class Sample:
    """Once per scrape interval: what Prometheus saw, and the fleet's state."""

    t: float
    load_by_pod: dict[str, float]
    replicas: int
    running: int
    ready: int
    endpoints: int
    demand_by_pod: dict[str, float] = field(default_factory=dict)
    spares_ready: int = 0


@dataclass
class Autoscaler:
    hpa: HpaSpec
    fleet: Fleet
    prometheus: Prometheus
    sync_period: float  # real seconds
    adapter_window: float  # real seconds (the chart README rule's [1m] for sdxl_load, time-compressed)
    time_scale: float
    clock: Callable[[], float]
    syncs: list[SyncRecord] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)

    def __post_init__(self) -> None:
        # The controller counts windows and policy periods in chart seconds: its clock runs 1/time_scale.
        self.controller = HorizontalController(clock=lambda: time.monotonic() / self.time_scale)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.sync_once()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), self.sync_period)

    async def sync_once(self) -> None:
        current = self.fleet.replicas
        pods = [p.info() for p in self.fleet.pods]
        proposal: int | None = None
        usage: int | None = None
        series = series_name(self.hpa.metric_name)
        try:
            if self.hpa.metric_type == "Pods":
                names = [p.name for p in pods]
                # The README's adapter rules: sdxl_load averaged over [1m], sdxl_demand as scraped.
                window = self.adapter_window if series == LOAD_METRIC else 0.0
                result = await self.prometheus.query(
                    pods_metric_query(series, self.prometheus.namespace, names, window)
                )
                metrics = {labels["pod"]: to_milli(value) for labels, value in result if "pod" in labels}
                proposal, usage = get_metric_replicas(
                    current, self.hpa.target_average_milli, metrics, pods, self.hpa.tolerances
                )
            else:
                result = await self.prometheus.query(
                    external_metric_query(series, self.prometheus.namespace, self.prometheus.job)
                )
                status_replicas = len([p for p in pods if not p.being_deleted])
                proposal, usage = get_external_per_pod_metric_replicas(
                    status_replicas,
                    self.hpa.target_average_milli,
                    [to_milli(v) for _, v in result],
                    self.hpa.tolerances,
                )
        except MetricsUnavailable as e:
            self.syncs.append(
                SyncRecord(
                    self.clock(),
                    current,
                    None,
                    current,
                    None,
                    f"FailedGetMetric: {e}",
                    len(self.fleet.ready()),
                )
            )
            return
        decision = self.controller.reconcile(
            current, proposal, self.hpa.min_replicas, self.hpa.max_replicas, self.hpa.behavior
        )
        if decision.rescale:
            self.fleet.scale(decision.desired_replicas)
        reason = decision.scaling_limited_reason or decision.able_to_scale_reason
        self.syncs.append(
            SyncRecord(
                self.clock(),
                current,
                proposal,
                decision.desired_replicas,
                usage,
                reason,
                len(self.fleet.ready()),
            )
        )

    async def observe(self, stop: asyncio.Event, interval: float) -> None:
        while not stop.is_set():
            loads, demands = await self._by_pod(LOAD_METRIC), await self._by_pod(DEMAND_METRIC)
            self.samples.append(
                Sample(
                    self.clock(),
                    loads,
                    self.fleet.replicas,
                    len([p for p in self.fleet.pods if p.phase == PodPhase.RUNNING]),
                    len(self.fleet.ready()),
                    len(self.fleet.dns.addresses),
                    demands,
                    self.fleet.spares_ready,
                )
            )
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)

    async def _by_pod(self, metric: str) -> dict[str, float]:
        try:
            result = await self.prometheus.query(f'{metric}{{job="{self.prometheus.job}"}}')
        except (OSError, RuntimeError):
            return {}
        return {labels.get("pod", "?"): value for labels, value in result}


def grpc_target(dns: Dns) -> str:
    return dns.target(GRPC_PORT)
