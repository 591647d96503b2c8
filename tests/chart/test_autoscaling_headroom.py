"""The HPA's signal and the chart's headroom: `autoscaling.metric`, `targetDemand`, `headroom.idleSlots`
(a recording rule the HPA reads as an External metric) and `headroom.spareNodes` (a CapacityBuffer where
the cluster serves it, otherwise low-priority placeholder pods of the server pod's shape)."""

from __future__ import annotations

import pytest
from sdxl_test_support.chart_render import HelmError, objects_of_kind, one, pod_spec, render

ADAPTER = {"metrics": {"backend": "prometheus-adapter"}}
CAPACITY_BUFFER_API = "autoscaling.x-k8s.io/v1beta1/CapacityBuffer"


def _metric(values: dict) -> dict:
    [metric] = one(render(values), "HorizontalPodAutoscaler")["spec"]["metrics"]
    return metric


def test_without_idle_slots_the_hpa_reads_demand_per_pod() -> None:
    no_idle = {"autoscaling": {"headroom": {"idleSlots": 0}}}
    pods = _metric({**ADAPTER, **no_idle})
    assert (pods["type"], pods["pods"]["metric"]["name"]) == ("Pods", "sdxl_demand")
    assert pods["pods"]["target"] == {"type": "AverageValue", "averageValue": "0.7"}
    gmp = _metric(no_idle)
    assert gmp["external"]["metric"]["name"] == "prometheus.googleapis.com|sdxl_demand|gauge"


def test_load_stays_an_option_with_its_own_target() -> None:
    for values, kind in ((ADAPTER, "pods"), ({}, "external")):
        metric = _metric({**values, "autoscaling": {"metric": "load", "targetLoad": 0.9}})
        assert (
            metric[kind]["metric"]["name"].replace("prometheus.googleapis.com|", "").startswith("sdxl_load")
        )
        assert metric[kind]["target"]["averageValue"] == "0.9"


def test_idle_slots_need_the_recording_rules() -> None:
    with pytest.raises(HelmError, match=r"autoscaling.headroom.idleSlots needs monitoring.rules.enabled"):
        render({"monitoring": {"rules": {"enabled": False}}})
    render({"monitoring": {"rules": {"enabled": False}}, "autoscaling": {"headroom": {"idleSlots": 0}}})


def test_the_recording_rule_carries_the_target_and_idle_slots_and_runs_at_the_scrape_interval() -> None:
    manifests = render({"autoscaling": {"targetDemand": 0.6, "headroom": {"idleSlots": 8}}})
    groups = one(manifests, "Rules")["spec"]["groups"]
    [group] = [g for g in groups if g["name"] == "sdxl-serve.autoscaling"]
    assert group["interval"] == one(manifests, "PodMonitoring")["spec"]["endpoints"][0]["interval"]
    [rule] = group["rules"]
    assert rule["record"] == "sdxl_demand_with_headroom"
    assert "0.6 * (sum by (namespace, job) (sdxl_demand{" in rule["expr"]
    assert "+ 8 / avg by (namespace, job) (sdxl_slots_total{" in rule["expr"]


def test_spare_nodes_are_placeholder_pods_of_the_server_pods_shape_below_every_priority() -> None:
    manifests = render({"autoscaling": {"headroom": {"spareNodes": 2}}})
    server = pod_spec(manifests)
    placeholders = one(manifests, "Deployment", "-headroom")
    assert placeholders["spec"]["replicas"] == 2
    spec = placeholders["spec"]["template"]["spec"]
    for field in ("nodeSelector", "tolerations"):
        assert spec[field] == server[field], field
    [container] = spec["containers"]
    assert (
        container["resources"] == next(c for c in server["containers"] if c["name"] == "server")["resources"]
    )
    priority = one(manifests, "PriorityClass", "-headroom")
    assert spec["priorityClassName"] == priority["metadata"]["name"]
    assert priority["value"] < 0 and priority["preemptionPolicy"] == "Never" and not priority["globalDefault"]
    assert "priorityClassName" not in server  # the server pods' 0 preempts the placeholders
    # Not selected by the server's Services, disruption budget or HPA.
    labels = placeholders["spec"]["template"]["metadata"]["labels"]
    assert labels["app.kubernetes.io/component"] == "headroom"
    assert not objects_of_kind(manifests, "CapacityBuffer")


def test_a_cluster_with_capacity_buffers_gets_one_instead_of_placeholders() -> None:
    manifests = render({}, "--api-versions", CAPACITY_BUFFER_API)
    buffer = one(manifests, "CapacityBuffer", "-headroom")
    template = one(manifests, "PodTemplate", "-headroom")
    assert buffer["apiVersion"] == CAPACITY_BUFFER_API.rsplit("/", 1)[0]
    assert buffer["spec"]["podTemplateRef"] == {"name": template["metadata"]["name"]}
    assert buffer["spec"]["replicas"] == 1
    assert template["template"]["spec"]["nodeSelector"] == pod_spec(manifests)["nodeSelector"]
    assert not objects_of_kind(manifests, "PriorityClass")
    assert [d["metadata"]["name"] for d in objects_of_kind(manifests, "Deployment")] == [
        "sdxl-test-sdxl-serve"
    ]


def test_no_spare_nodes_renders_no_headroom_objects() -> None:
    manifests = render(
        {"autoscaling": {"headroom": {"spareNodes": 0}}}, "--api-versions", CAPACITY_BUFFER_API
    )
    kinds = {m["kind"] for m in manifests}
    assert not kinds & {"CapacityBuffer", "PodTemplate", "PriorityClass"}
    assert len(objects_of_kind(manifests, "Deployment")) == 1
