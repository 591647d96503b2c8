"""The chart's rule groups and dashboard, and the Debian Prometheus tools, for the monitoring tests.

The rules are taken from ``helm template`` (the chart tests' renderer, sdxl_test_support.chart_render:
release sdxl-test, namespace serving), so that what promtool and Prometheus check is exactly what the chart
deploys. promtool and prometheus come from `make debian-tools` (SDXL_PROMTOOL, SDXL_PROMETHEUS); a missing
binary fails the tests, it never skips.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import pytest
import yaml
from sdxl_test_support.chart_render import CHART, NAMESPACE, one, render

REPO = pathlib.Path(__file__).resolve().parents[2]

JOB = "sdxl-test-sdxl-serve"  # the full name of release sdxl-test: the PodMonitoring's / Service's name
DASHBOARD = CHART / "dashboards" / "sdxl-serve.json"
_RULE_KINDS = {"gmp": "Rules", "prometheus-adapter": "PrometheusRule"}


def debian_tool(variable: str, name: str) -> str:
    path = os.environ.get(variable) or str(REPO / ".tools" / "debian" / "bin" / name)
    if not os.access(path, os.X_OK):
        pytest.fail(f"{name} not found at {path}: run `make debian-tools` (make test does it)", pytrace=False)
    return path


def rule_groups(backend: str = "gmp", values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The rule groups the chart renders for ``backend`` with ``values`` on top of the defaults."""
    manifests = render({**(values or {}), "metrics": {"backend": backend}})
    groups: list[dict[str, Any]] = one(manifests, _RULE_KINDS[backend])["spec"]["groups"]
    return groups


def write_rules(path: pathlib.Path, groups: list[dict[str, Any]]) -> pathlib.Path:
    """A Prometheus rule file holding ``groups``."""
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    return path


def alert_names(groups: list[dict[str, Any]]) -> set[str]:
    return {rule["alert"] for group in groups for rule in group["rules"] if "alert" in rule}


def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


__all__ = [
    "JOB",
    "NAMESPACE",
    "alert_names",
    "dashboard",
    "debian_tool",
    "render",
    "rule_groups",
    "write_rules",
]
