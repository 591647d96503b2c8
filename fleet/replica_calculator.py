"""The HPA's replica calculator, ported from kubernetes/kubernetes ``pkg/controller/podautoscaler``
(``replica_calculator.go``, ``metrics/utilization.go``), for the two metric kinds the chart renders:

- ``Pods`` metric with an ``AverageValue`` target (prometheus-adapter): ``get_metric_replicas`` =
  ``GetMetricReplicas`` -> ``calcPlainMetricReplicas``, with ``groupPods``' treatment of pods that are
  pending, failed, being deleted, or have no metric;
- ``External`` metric with an ``AverageValue`` target (GMP through the Stackdriver adapter):
  ``get_external_per_pod_metric_replicas`` = ``GetExternalPerPodMetricReplicas``: the sum of the series
  divided by the Scale's status replicas, no per-pod readiness at all.

Values are milli-units in 64-bit integers, as upstream (``Quantity.MilliValue()``): the integer
divisions below are upstream's, and they matter at the tolerance's edge. Only what the chart uses is
ported (no CPU Resource metrics: their "initialization period" branch of ``groupPods`` is left out, and
for a non-CPU metric upstream never looks at a pod's Ready condition, which is exactly the point the
fleet harness examines).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

# --horizontal-pod-autoscaler-tolerance: the controller manager's default.
DEFAULT_TOLERANCE = 0.1


class PodPhase(StrEnum):
    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


@dataclass(frozen=True)
class PodInfo:
    """What the calculator reads of a pod (the fields ``groupPods`` looks at, for a non-CPU metric)."""

    name: str
    phase: PodPhase
    ready: bool = True
    being_deleted: bool = False  # metadata.deletionTimestamp is set


class MetricsUnavailable(RuntimeError):
    """Upstream returns an error and the HPA does not scale this cycle (condition ScalingActive False)."""


@dataclass(frozen=True)
class Tolerances:
    """Per-direction tolerance (``behavior.scale{Up,Down}.tolerance``, HPAConfigurableTolerance);
    both default to the controller's ``--horizontal-pod-autoscaler-tolerance``."""

    scale_down: float = DEFAULT_TOLERANCE
    scale_up: float = DEFAULT_TOLERANCE

    def within(self, usage_ratio: float) -> bool:
        """``isWithinTolerance``: no scaling when the ratio is this close to 1."""
        if usage_ratio < 1.0:
            return 1.0 - usage_ratio <= self.scale_down
        return usage_ratio - 1.0 <= self.scale_up


def group_pods(pods: list[PodInfo], metrics: dict[str, int]) -> tuple[int, set[str], set[str], set[str]]:
    """``groupPods`` for a non-CPU metric: (ready count, unready, missing, ignored).

    Deleted or failed pods are ignored; pending pods are "unready"; a running pod without a metric is
    "missing"; every other running pod counts as ready, whatever its Ready condition says.
    """
    ready_count = 0
    unready: set[str] = set()
    missing: set[str] = set()
    ignored: set[str] = set()
    for pod in pods:
        if pod.being_deleted or pod.phase == PodPhase.FAILED:
            ignored.add(pod.name)
            continue
        if pod.phase == PodPhase.PENDING:
            unready.add(pod.name)
            continue
        if pod.name not in metrics:
            missing.add(pod.name)
            continue
        ready_count += 1
    return ready_count, unready, missing, ignored


def get_metric_usage_ratio(metrics: dict[str, int], target_usage: int) -> tuple[float, int]:
    """``GetMetricUsageRatio``: (average / target, average), the average an integer division."""
    total = sum(metrics.values())
    current_usage = int(total / len(metrics))  # Go's int64 division truncates toward zero
    return current_usage / target_usage, current_usage


def get_metric_replicas(
    current_replicas: int,
    target_usage: int,
    metrics: dict[str, int],
    pods: list[PodInfo],
    tolerances: Tolerances = Tolerances(),
) -> tuple[int, int]:
    """``GetMetricReplicas`` / ``calcPlainMetricReplicas``: (desired replicas, average usage).

    ``metrics`` maps pod name to its milli-value, as the custom metrics API returned it (pods that are
    not in ``pods`` are dropped, as the metrics client drops them).
    """
    if not pods:
        raise MetricsUnavailable("no pods returned by selector while calculating replica count")
    metrics = {name: value for name, value in metrics.items() if name in {p.name for p in pods}}
    ready_count, unready, missing, ignored = group_pods(pods, metrics)
    for name in ignored | unready:
        metrics.pop(name, None)
    if not metrics:
        raise MetricsUnavailable("did not receive metrics for targeted pods (pods might be unready)")

    usage_ratio, usage = get_metric_usage_ratio(metrics, target_usage)
    scale_up_with_unready = bool(unready) and usage_ratio > 1.0
    if not scale_up_with_unready and not missing:
        if tolerances.within(usage_ratio):
            return current_replicas, usage
        return math.ceil(usage_ratio * ready_count), usage

    if missing:
        if usage_ratio < 1.0:
            # on a scale-down, treat missing pods as using exactly the target amount
            for name in missing:
                metrics[name] = target_usage
        elif usage_ratio > 1.0:
            # on a scale-up, treat missing pods as using 0% of the target
            for name in missing:
                metrics[name] = 0
    if scale_up_with_unready:
        for name in unready:
            metrics[name] = 0

    new_usage_ratio, _ = get_metric_usage_ratio(metrics, target_usage)
    if (
        tolerances.within(new_usage_ratio)
        or (usage_ratio < 1.0 and new_usage_ratio > 1.0)
        or (usage_ratio > 1.0 and new_usage_ratio < 1.0)
    ):
        # the change would be too small, or the rebalanced ratio points the other way
        return current_replicas, usage
    new_replicas = math.ceil(new_usage_ratio * len(metrics))
    if (new_usage_ratio < 1.0 and new_replicas > current_replicas) or (
        new_usage_ratio > 1.0 and new_replicas < current_replicas
    ):
        return current_replicas, usage
    return new_replicas, usage


def get_external_per_pod_metric_replicas(
    status_replicas: int,
    target_usage_per_pod: int,
    series: list[int],
    tolerances: Tolerances = Tolerances(),
) -> tuple[int, int]:
    """``GetExternalPerPodMetricReplicas``: (desired replicas, usage per pod).

    ``series`` are the milli-values of every series the selector matched; ``status_replicas`` is the
    Scale's ``status.replicas`` (every pod the Deployment has, ready or not).
    """
    if not series:
        raise MetricsUnavailable("unable to get external metric: no metrics returned")
    usage = sum(series)
    replica_count = status_replicas
    if status_replicas <= 0:
        # Every pod is being deleted (the harness counts those out of status.replicas). Go divides in
        # float64 here: usage / 0 is +Inf, outside any tolerance, so the count becomes usage / target;
        # 0 / 0 is NaN, within no tolerance test, so the count stays 0. The usage per pod has no pods to
        # spread over: the whole usage is reported (Go's conversion of +Inf to int64 is undefined).
        replica_count = math.ceil(usage / target_usage_per_pod) if usage > 0 else 0
        return replica_count, usage
    usage_ratio = usage / (target_usage_per_pod * replica_count)
    if not tolerances.within(usage_ratio):
        replica_count = math.ceil(usage / target_usage_per_pod)
    return replica_count, math.ceil(usage / status_replicas)
