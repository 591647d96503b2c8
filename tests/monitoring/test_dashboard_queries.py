"""Every query of the chart's Grafana dashboard, and every recording rule, returns data from a real
Prometheus scraping a real server.

The server is the tiny model on 127.0.0.1; Prometheus scrapes it every second under the labels the chart's
scrape objects give (job = the release's full name, namespace), plus a kube-state-metrics stand-in for
the HPA's series (prometheus_process.py says why), and evaluates the chart's rules every second. Traffic
comes in two rounds, each seen by a scrape, so that every counter and histogram has grown inside the
rate window. A query that returns nothing, or only NaN, fails.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterator

import grpc
import pytest
from monitoring_helpers import JOB, NAMESPACE, dashboard, debian_tool, render, rule_groups, write_rules
from prometheus_process import Prometheus, static_exporter
from sdxl_client._proto.sdxl.v1 import sdxl_pb2, sdxl_pb2_grpc
from sdxl_test_support.servers import started_servers

DATA_TIMEOUT_SECONDS = 60.0
# What Grafana substitutes: the template variables and the rate window.
VARIABLES = {"$namespace": NAMESPACE, "$job": JOB, "$__rate_interval": "1m"}
_HPA_LABELS = f'namespace="{NAMESPACE}",horizontalpodautoscaler="{JOB}"'
KUBE_STATE_METRICS = "".join(
    f"kube_horizontalpodautoscaler_{name}{{{_HPA_LABELS}}} {value}\n"
    for name, value in (
        ("spec_max_replicas", 8),
        ("spec_min_replicas", 1),
        ("status_current_replicas", 1),
        ("status_desired_replicas", 1),
    )
)


def _substitute(expr: str) -> str:
    return re.sub(r"\$\w+", lambda m: VARIABLES[m.group(0)], expr)


def _wait_for_data(prometheus: Prometheus, expr: str) -> list[tuple[dict[str, str], float]]:
    """Polls an instant query until it returns a sample that is a number (not NaN)."""
    deadline = time.monotonic() + DATA_TIMEOUT_SECONDS
    while True:
        samples = prometheus.query(expr)
        if any(not math.isnan(value) for _, value in samples):
            return samples
        if time.monotonic() > deadline:
            raise AssertionError(f"no data within {DATA_TIMEOUT_SECONDS}s for {expr}: {samples}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def prometheus(tiny_model_dir, compilation_cache_dir, tmp_path_factory) -> Iterator[Prometheus]:
    work_dir = tmp_path_factory.mktemp("prometheus")
    every_second = rule_groups(values={"monitoring": {"rules": {"interval": "1s"}}})
    rules = write_rules(work_dir / "rules.yaml", every_second)
    with started_servers() as start, static_exporter(KUBE_STATE_METRICS) as ksm_port:
        server = start()
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(rules)],
            "scrape_configs": [
                {
                    "job_name": JOB,
                    "static_configs": [
                        {"targets": [f"127.0.0.1:{server.metrics_port}"], "labels": {"namespace": NAMESPACE}}
                    ],
                },
                {
                    "job_name": "kube-state-metrics",
                    "honor_labels": True,  # its namespace label is the HPA's, as in a real setup
                    "static_configs": [{"targets": [f"127.0.0.1:{ksm_port}"]}],
                },
            ],
        }
        prometheus = Prometheus(debian_tool("SDXL_PROMETHEUS", "prometheus"), work_dir, config)
        try:
            with server.channel() as channel:
                stub = sdxl_pb2_grpc.ImageServiceStub(channel)
                for round_, requests in enumerate((1, 2), start=1):
                    for _ in range(requests):
                        stub.Generate(sdxl_pb2.GenerateRequest(prompt="a kettle", steps=2), timeout=120)
                    with pytest.raises(grpc.RpcError):  # an error status for the "by status" panel
                        stub.Generate(sdxl_pb2.GenerateRequest(prompt=""), timeout=30)
                    # The next round starts only once Prometheus has scraped this one.
                    ok = f'sdxl_requests_total{{job="{JOB}", code="OK"}} >= {1 + 2 * (round_ - 1)}'
                    _wait_for_data(prometheus, ok)
            yield prometheus
        finally:
            prometheus.stop()


def _panel_queries() -> list[tuple[str, str]]:
    return [
        (f"{panel['title']} / {target['legendFormat']}", target["expr"])
        for panel in dashboard()["panels"]
        for target in panel["targets"]
    ]


@pytest.mark.parametrize(("target", "expr"), _panel_queries(), ids=[t for t, _ in _panel_queries()])
def test_every_dashboard_query_returns_data(prometheus, target, expr) -> None:
    _wait_for_data(prometheus, _substitute(expr))


def test_the_dashboard_variables_find_the_release(prometheus) -> None:
    variables = {v["name"]: v for v in dashboard()["templating"]["list"] if v["type"] == "query"}
    for name, expected in (("namespace", NAMESPACE), ("job", JOB)):
        query = _substitute(variables[name]["query"]["query"])
        match = re.fullmatch(r"label_values\((.+), (\w+)\)", query)
        assert match, query
        values = prometheus.api(f"label/{match.group(2)}/values", **{"match[]": match.group(1)})
        assert expected in values


def test_every_recording_rule_returns_data_and_every_rule_evaluates(prometheus) -> None:
    records = [rule["record"] for group in rule_groups() for rule in group["rules"] if "record" in rule]
    for record in records:
        _wait_for_data(prometheus, f'{record}{{job="{JOB}"}}')
    rules = [rule for group in prometheus.api("rules")["groups"] for rule in group["rules"]]
    assert len(rules) == 14  # 8 recording rules (2 for autoscaling on demand), 6 alerts
    assert [(rule["name"], rule.get("lastError")) for rule in rules if rule["health"] != "ok"] == []


def test_the_chart_ships_this_dashboard_and_it_covers_the_serving_story() -> None:
    manifests = render({"monitoring": {"dashboard": {"enabled": True}}})
    [config_map] = [m for m in manifests if m["metadata"]["name"].endswith("-dashboard")]
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"  # what Grafana's sidecar looks for
    assert json.loads(config_map["data"]["sdxl-serve.json"]) == dashboard()
    exprs = " ".join(expr for _, expr in _panel_queries())
    for metric in (
        "sdxl_load", "kube_horizontalpodautoscaler_status_desired_replicas", "sdxl_queue_depth",
        "sdxl_queue_wait_seconds", "sdxl_request_duration_seconds", "sdxl_step_duration_seconds",
        "sdxl_device_busy_ratio", "sdxl_requests_total", "sdxl_startup_seconds", "sdxl_compile_seconds",
    ):  # fmt: skip
        assert metric in exprs, metric
    assert "histogram_quantile(0.99" in exprs and "histogram_quantile(0.5" in exprs
