"""Autoscaling, metrics scraping, Services, the disruption budget, the network policy and `helm test`."""

from __future__ import annotations

import pytest
from sdxl_test_support.chart_render import (
    Manifest,
    is_helm_test,
    objects_of_kind,
    one,
    pod_spec,
    render_value_set,
    server_container,
)


def _pod_labels(manifests: list[Manifest]) -> dict[str, str]:
    return dict(one(manifests, "Deployment")["spec"]["template"]["metadata"]["labels"])


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def test_gmp_backend_scales_on_the_external_stackdriver_metric() -> None:
    manifests = render_value_set("defaults")
    hpa = one(manifests, "HorizontalPodAutoscaler")
    [metric] = hpa["spec"]["metrics"]
    assert metric["type"] == "External"
    # The default: demand with idle-slot headroom, one series recorded by the chart's rules.
    assert metric["external"]["metric"]["name"] == "prometheus.googleapis.com|sdxl_demand_with_headroom|gauge"
    assert metric["external"]["target"] == {"type": "AverageValue", "averageValue": "0.7"}
    # The series are those that this release's PodMonitoring scrapes (GMP sets `job` to its name).
    selector = metric["external"]["metric"]["selector"]["matchLabels"]
    pod_monitoring = one(manifests, "PodMonitoring")
    assert selector["resource.labels.job"] == pod_monitoring["metadata"]["name"]
    assert selector["resource.labels.namespace"] == hpa["metadata"]["namespace"]
    assert _selects(pod_monitoring["spec"]["selector"]["matchLabels"], _pod_labels(manifests))
    assert [e["port"] for e in pod_monitoring["spec"]["endpoints"]] == ["metrics"]
    assert not objects_of_kind(manifests, "ServiceMonitor")


def test_gmp_selector_can_be_narrowed_to_one_cluster() -> None:
    hpa = one(render_value_set("everything-optional"), "HorizontalPodAutoscaler")
    selector = hpa["spec"]["metrics"][0]["external"]["metric"]["selector"]["matchLabels"]
    assert selector["resource.labels.cluster"] == "prod-us-east5"


def test_prometheus_adapter_backend_scales_on_the_recorded_external_metric() -> None:
    manifests = render_value_set("prometheus-adapter")
    [metric] = one(manifests, "HorizontalPodAutoscaler")["spec"]["metrics"]
    # The default's recorded series through the README's external rule, selected by this release's job.
    assert metric["type"] == "External"
    assert metric["external"]["metric"]["name"] == "sdxl_demand_with_headroom"
    assert metric["external"]["target"] == {"type": "AverageValue", "averageValue": "0.7"}
    assert metric["external"]["metric"]["selector"]["matchLabels"] == {"job": "sdxl-test-sdxl-serve"}
    monitor = one(manifests, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    service = one(manifests, "Service", "sdxl-serve")
    assert _selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    service_ports = {p["name"] for p in service["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= service_ports
    assert not objects_of_kind(manifests, "PodMonitoring")


def test_hpa_targets_the_deployment_and_scales_up_fast_and_down_slowly() -> None:
    manifests = render_value_set("defaults")
    hpa = one(manifests, "HorizontalPodAutoscaler")["spec"]
    deployment = one(manifests, "Deployment")
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert 1 <= hpa["minReplicas"] <= hpa["maxReplicas"]
    up, down = hpa["behavior"]["scaleUp"], hpa["behavior"]["scaleDown"]
    assert up["stabilizationWindowSeconds"] == 0
    assert down["stabilizationWindowSeconds"] >= 300
    assert max(p["value"] for p in up["policies"] if p["type"] == "Pods") > max(
        p["value"] for p in down["policies"] if p["type"] == "Pods"
    )
    # The HPA owns the replica count: a `replicas` field would fight it on every `helm upgrade`.
    assert "replicas" not in deployment["spec"]


def test_without_hpa_the_replica_count_is_fixed() -> None:
    manifests = render_value_set("hpa-disabled")
    assert not objects_of_kind(manifests, "HorizontalPodAutoscaler")
    assert one(manifests, "Deployment")["spec"]["replicas"] == 3


def test_metrics_backend_none_renders_no_monitoring_objects() -> None:
    manifests = render_value_set("cpu")
    kinds = {m["kind"] for m in manifests}
    assert not kinds & {"PodMonitoring", "ServiceMonitor", "HorizontalPodAutoscaler"}


@pytest.mark.parametrize("value_set", ["defaults", "cpu"])
def test_services_select_exactly_the_server_pods(value_set: str) -> None:
    manifests = render_value_set(value_set)
    pod_labels = _pod_labels(manifests)
    deployment_selector = one(manifests, "Deployment")["spec"]["selector"]["matchLabels"]
    assert _selects(deployment_selector, pod_labels)
    services = objects_of_kind(manifests, "Service")
    assert len(services) == 2
    for service in services:
        assert _selects(service["spec"]["selector"], pod_labels)
        grpc = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
        assert grpc["port"] == 50051
        assert grpc["targetPort"] == "grpc"
    headless = one(manifests, "Service", "-headless")
    assert headless["spec"]["clusterIP"] == "None"
    # The helm test pod must never receive traffic or count for the PDB.
    test_pod = next(m for m in manifests if is_helm_test(m))
    assert not _selects(deployment_selector, test_pod["metadata"]["labels"])


def test_headless_service_is_optional() -> None:
    assert len(objects_of_kind(render_value_set("everything-optional"), "Service")) == 1


def test_disruption_budget_guards_the_server_pods() -> None:
    manifests = render_value_set("defaults")
    budget = one(manifests, "PodDisruptionBudget")["spec"]
    assert budget["maxUnavailable"] == 1
    assert budget["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    assert _selects(budget["selector"]["matchLabels"], _pod_labels(manifests))


def test_network_policy_admits_the_api_and_metrics_only() -> None:
    manifests = render_value_set("everything-optional")
    policy = one(manifests, "NetworkPolicy")["spec"]
    assert _selects(policy["podSelector"]["matchLabels"], _pod_labels(manifests))
    assert policy["policyTypes"] == ["Ingress"]
    grpc_rule, metrics_rule = policy["ingress"]
    # Both front doors (gRPC and the OpenAI Images API over HTTP) admit the same peers.
    assert grpc_rule["ports"] == [{"port": "grpc", "protocol": "TCP"}, {"port": "http", "protocol": "TCP"}]
    frontend, test_pod_peer = grpc_rule["from"]
    assert frontend["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "frontend"}
    # The helm test pod stays admitted when gRPC clients are restricted.
    test_pod = next(m for m in manifests if is_helm_test(m))
    assert _selects(test_pod_peer["podSelector"]["matchLabels"], test_pod["metadata"]["labels"])
    namespace = metrics_rule["from"][0]["namespaceSelector"]["matchLabels"]
    assert namespace == {"kubernetes.io/metadata.name": "gmp-system"}
    container_ports = {p["name"] for p in server_container(manifests)["ports"]}
    assert {p["port"] for r in policy["ingress"] for p in r["ports"]} == container_ports
    assert not objects_of_kind(render_value_set("defaults"), "NetworkPolicy")


def test_helm_test_checks_grpc_health_through_the_service() -> None:
    manifests = render_value_set("defaults")
    test_pod = next(m for m in manifests if is_helm_test(m))
    service = one(manifests, "Service", "sdxl-serve")
    container = test_pod["spec"]["containers"][0]
    assert container["image"] == server_container(manifests)["image"]  # pinned like the server
    script, target = container["args"]
    assert "grpc_health.v1" in script
    assert "sdxl.v1.ImageService" in script
    assert target == f"{service['metadata']['name']}.serving.svc:50051"
    assert test_pod["spec"]["restartPolicy"] == "Never"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert (
        pod_spec(manifests)["securityContext"]["runAsUser"]
        == test_pod["spec"]["securityContext"]["runAsUser"]
    )
    compile(script, "helm-test", "exec")  # the embedded health check is valid Python
