"""What the fleet takes from the chart: `helm template` output, never a second copy of its values.

The HPA object is parsed into the `kubernetes` package's ``V2HorizontalPodAutoscaler`` and refused if it
holds a field that model does not know (the client's deserializer would drop it silently; an API server
in strict mode refuses it), then API-server defaulting is applied to ``behavior`` as
``pkg/apis/autoscaling/v2/defaults.go`` does. The pods' timings come from the rendered Deployment
(probes, preStop sleep, termination grace) and ConfigMap (drain, connection age), the scrape interval
from the PodMonitoring or ServiceMonitor.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from kubernetes.client import ApiClient, V2HorizontalPodAutoscaler
from kubernetes.utils import parse_quantity

from fleet.horizontal import (
    MAX_CHANGE,
    PERCENT_POLICY,
    PODS_POLICY,
    Behavior,
    ScalingPolicy,
    ScalingRules,
)
from fleet.replica_calculator import DEFAULT_TOLERANCE, Tolerances

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm" / "sdxl-serve"
RELEASE = "sdxl-serve"
NAMESPACE = "fleet"


class ChartError(ValueError):
    pass


@dataclass(frozen=True)
class HpaSpec:
    """The HPA as the controller reads it, values in the units upstream computes with (milli-values)."""

    name: str
    min_replicas: int
    max_replicas: int
    metric_type: str  # "Pods" or "External"
    metric_name: str
    metric_selector: dict[str, str]
    target_average_milli: int
    behavior: Behavior | None
    tolerances: Tolerances


@dataclass(frozen=True)
class PodTimings:
    """Seconds, as rendered (before the scenario's time compression)."""

    readiness_period: float
    readiness_failure_threshold: int
    startup_period: float
    startup_failure_threshold: int
    pre_stop_sleep: float
    termination_grace: float
    drain_seconds: float
    max_connection_age_seconds: float
    scrape_interval: float
    # The compilation-cache volume is an emptyDir (every new pod compiles) rather than shared storage.
    per_pod_compilation_cache: bool


@dataclass(frozen=True)
class RenderedChart:
    hpa: HpaSpec
    pods: PodTimings
    values_file_text: str  # the values given to helm, for the report
    # The PrometheusRule's (or GMP Rules') rule groups, as rendered: the fleet's Prometheus evaluates them,
    # so that an HPA on a recorded series (sdxl_demand_with_headroom) reads what the cluster's would.
    rule_groups: tuple[dict[str, Any], ...] = ()
    # Nodes the chart keeps provisioned and empty (autoscaling.headroom.spareNodes, as the placeholder
    # Deployment's or the CapacityBuffer's replicas): a new pod that finds one skips provisioning.
    spare_nodes: int = 0


def helm_binary() -> str:
    helm = os.environ.get("SDXL_HELM") or str(REPO / ".tools" / "bin" / "helm")
    if not os.access(helm, os.X_OK):
        raise ChartError(f"Helm not found at {helm}: run `make helm` (make test does it) or set SDXL_HELM")
    return helm


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    """`helm template` of the chart with ``values`` on top of its defaults."""
    with tempfile.TemporaryDirectory(prefix="fleet-helm-") as home:
        env = {**os.environ, "HELM_CACHE_HOME": home, "HELM_CONFIG_HOME": home, "HELM_DATA_HOME": home}
        values_path = Path(home) / "values.json"
        values_path.write_text(json.dumps(values))
        result = subprocess.run(
            [
                helm_binary(),
                "template",
                RELEASE,
                str(CHART),
                "--namespace",
                NAMESPACE,
                "-f",
                str(values_path),
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            check=False,
        )
    if result.returncode != 0:
        raise ChartError(f"helm template failed: {result.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def load(values: dict[str, Any]) -> RenderedChart:
    objects = render(values)
    hpa_objects = [o for o in objects if o.get("kind") == "HorizontalPodAutoscaler"]
    if len(hpa_objects) != 1:
        raise ChartError("the chart rendered no HorizontalPodAutoscaler (is autoscaling.enabled false?)")
    return RenderedChart(
        hpa=hpa_spec(parse_hpa(hpa_objects[0])),
        pods=pod_timings(objects),
        values_file_text=yaml.safe_dump(values, sort_keys=True),
        rule_groups=tuple(
            group
            for o in objects
            if o.get("kind") in ("PrometheusRule", "Rules")
            for group in o["spec"]["groups"]
        ),
        spare_nodes=spare_nodes(objects),
    )


def spare_nodes(objects: list[dict[str, Any]]) -> int:
    """The headroom placeholders' replicas (Deployment ``<fullname>-headroom``) or the CapacityBuffer's."""
    for o in objects:
        if o.get("kind") == "CapacityBuffer" or (
            o.get("kind") == "Deployment" and o["metadata"]["name"].endswith("-headroom")
        ):
            return int(o["spec"].get("replicas", 0))
    return 0


def series_name(metric_name: str) -> str:
    """The Prometheus series an HPA metric name stands for: GMP's External names wrap it
    (``prometheus.googleapis.com|sdxl_demand|gauge``); prometheus-adapter's are the series' own name."""
    parts = metric_name.split("|")
    if len(parts) == 3 and parts[0] == "prometheus.googleapis.com":
        return parts[1]
    return metric_name


def parse_hpa(manifest: dict[str, Any]) -> V2HorizontalPodAutoscaler:
    """The manifest as the typed model; a field the model does not know is an error naming it."""
    client = ApiClient()
    hpa = client.deserialize(json.dumps(manifest), "V2HorizontalPodAutoscaler", "application/json")
    unknown = _unknown_fields(manifest, client.sanitize_for_serialization(hpa), "")
    if unknown:
        raise ChartError(f"HorizontalPodAutoscaler has fields autoscaling/v2 does not define: {unknown}")
    return hpa


def _unknown_fields(given: Any, kept: Any, path: str) -> list[str]:
    if isinstance(given, dict):
        if not isinstance(kept, dict):
            return [path or "."]
        found = []
        for key, value in given.items():
            if key not in kept:
                found.append(f"{path}.{key}".lstrip("."))
            else:
                found += _unknown_fields(value, kept[key], f"{path}.{key}")
        return found
    if isinstance(given, list) and isinstance(kept, list):
        return [
            f
            for i, (g, k) in enumerate(zip(given, kept, strict=False))
            for f in _unknown_fields(g, k, f"{path}[{i}]")
        ]
    return []


def milli_value(quantity: str) -> int:
    """``Quantity.MilliValue()``: the value in thousandths, rounded up."""
    return math.ceil(parse_quantity(quantity) * 1000)


def hpa_spec(hpa: V2HorizontalPodAutoscaler) -> HpaSpec:
    spec = hpa.spec
    if not spec.metrics or len(spec.metrics) != 1:
        raise ChartError("the fleet's HPA port reads exactly one metric (the chart renders one)")
    metric = spec.metrics[0]
    if metric.type == "Pods":
        source, selector = metric.pods, {}
        if metric.pods.metric.selector is not None:
            selector = dict(metric.pods.metric.selector.match_labels or {})
    elif metric.type == "External":
        source = metric.external
        selector = (
            dict(metric.external.metric.selector.match_labels or {})
            if metric.external.metric.selector
            else {}
        )
    else:
        raise ChartError(f"spec.metrics[0].type {metric.type!r}: the port handles Pods and External")
    if source.target.type != "AverageValue" or source.target.average_value is None:
        raise ChartError("spec.metrics[0] target must be AverageValue (what the chart renders)")
    behavior = defaulted_behavior(spec.behavior)
    return HpaSpec(
        name=hpa.metadata.name,
        min_replicas=spec.min_replicas if spec.min_replicas is not None else 1,
        max_replicas=spec.max_replicas,
        metric_type=metric.type,
        metric_name=source.metric.name,
        metric_selector=selector,
        target_average_milli=milli_value(str(source.target.average_value)),
        behavior=behavior,
        tolerances=Tolerances(
            scale_down=_tolerance(behavior.scale_down if behavior else None),
            scale_up=_tolerance(behavior.scale_up if behavior else None),
        ),
    )


def _tolerance(rules: ScalingRules | None) -> float:
    return DEFAULT_TOLERANCE if rules is None or rules.tolerance is None else rules.tolerance


def defaulted_behavior(behavior: Any) -> Behavior | None:
    """``SetDefaults_HorizontalPodAutoscalerBehavior``: a nil behavior stays nil; otherwise every nil
    field of each direction takes ``GenerateHPAScale{Up,Down}Rules``' default."""
    if behavior is None:
        return None
    up_default = ScalingRules(
        0, MAX_CHANGE, (ScalingPolicy(PODS_POLICY, 4, 15), ScalingPolicy(PERCENT_POLICY, 100, 15))
    )
    down_default = ScalingRules(None, MAX_CHANGE, (ScalingPolicy(PERCENT_POLICY, 100, 15),))
    return Behavior(
        scale_up=_copy_rules(behavior.scale_up, up_default),
        scale_down=_copy_rules(behavior.scale_down, down_default),
    )


def _copy_rules(given: Any, default: ScalingRules) -> ScalingRules:
    """``copyHPAScalingRules``: the given fields over the defaults."""
    if given is None:
        return default
    policies = default.policies
    if given.policies is not None:
        policies = tuple(ScalingPolicy(p.type, p.value, p.period_seconds) for p in given.policies)
    return ScalingRules(
        stabilization_window_seconds=(
            given.stabilization_window_seconds
            if given.stabilization_window_seconds is not None
            else default.stabilization_window_seconds
        ),
        select_policy=given.select_policy if given.select_policy is not None else default.select_policy,
        policies=policies,
        tolerance=float(parse_quantity(given.tolerance)) if given.tolerance is not None else None,
    )


def pod_timings(objects: list[dict[str, Any]]) -> PodTimings:
    deployment = _one([o for o in objects if not o["metadata"]["name"].endswith("-headroom")], "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = next(c for c in pod["containers"] if c["name"] == "server")
    config = _one(objects, "ConfigMap")["data"]
    readiness, startup = container["readinessProbe"], container["startupProbe"]
    pre_stop = container.get("lifecycle", {}).get("preStop", {})
    return PodTimings(
        readiness_period=float(readiness.get("periodSeconds", 10)),
        readiness_failure_threshold=int(readiness.get("failureThreshold", 3)),
        startup_period=float(startup.get("periodSeconds", 10)),
        startup_failure_threshold=int(startup.get("failureThreshold", 3)),
        pre_stop_sleep=float(pre_stop.get("sleep", {}).get("seconds", 0)),
        termination_grace=float(pod.get("terminationGracePeriodSeconds", 30)),
        drain_seconds=float(config.get("SDXL_DRAIN_SECONDS", 60)),
        max_connection_age_seconds=float(config.get("SDXL_MAX_CONNECTION_AGE_SECONDS", 300)),
        scrape_interval=_scrape_interval(objects),
        per_pod_compilation_cache=any(
            v["name"] == "compilation-cache" and "emptyDir" in v for v in pod.get("volumes", [])
        ),
    )


def _one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [o for o in objects if o.get("kind") == kind]
    if len(found) != 1:
        raise ChartError(f"expected one {kind} in the rendered chart, found {len(found)}")
    return found[0]


def _scrape_interval(objects: list[dict[str, Any]]) -> float:
    for o in objects:
        if o.get("kind") in ("PodMonitoring", "ServiceMonitor"):
            endpoint = o["spec"]["endpoints"][0]
            return parse_duration(endpoint.get("interval", "30s"))
    raise ChartError("the chart rendered no PodMonitoring or ServiceMonitor (metrics.backend none?)")


def parse_duration(text: str) -> float:
    """Prometheus-style durations as the chart writes them: ``15s``, ``1m``, ``500ms``."""
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    for suffix in ("ms", "s", "m", "h"):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * units[suffix]
    raise ChartError(f"cannot read duration {text!r}")
