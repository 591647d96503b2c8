"""The chart opens the HTTP front door (the OpenAI Images API) by default, and both Services expose it."""

from __future__ import annotations

from sdxl_test_support.chart_render import objects_of_kind, one, render, server_container, server_settings


def test_http_is_served_on_8080_and_exposed_on_both_services_by_default() -> None:
    manifests = render({})
    assert server_settings(manifests)["SDXL_HTTP_PORT"] == "8080"
    ports = {p["name"]: p for p in server_container(manifests)["ports"]}
    assert ports["http"]["containerPort"] == 8080
    services = objects_of_kind(manifests, "Service")
    assert len(services) == 2  # the balanced one and the headless one
    for service in services:
        http = next(p for p in service["spec"]["ports"] if p["name"] == "http")
        assert (http["port"], http["targetPort"], http["appProtocol"]) == (8080, "http", "http")


def test_the_service_port_for_http_is_a_value() -> None:
    service = one(render({"service": {"httpPort": 80}}), "Service", "-sdxl-serve")
    http = next(p for p in service["spec"]["ports"] if p["name"] == "http")
    assert (http["port"], http["targetPort"]) == (80, "http")


def test_http_off_leaves_grpc_as_the_only_door() -> None:
    manifests = render({"http": {"enabled": False}})
    assert "SDXL_HTTP_PORT" not in server_settings(manifests)  # the server's default: not served
    assert "http" not in {p["name"] for p in server_container(manifests)["ports"]}
    for service in objects_of_kind(manifests, "Service"):
        assert "http" not in {p["name"] for p in service["spec"]["ports"]}
