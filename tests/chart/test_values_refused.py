"""Invalid values are refused before anything reaches a cluster, with a message that names the value.

Single values are checked by values.schema.json (Helm reports the JSON path); rules that span several
values are checked in templates/_helpers.tpl (`sdxl-serve.validate`), whose messages name the values.
"""

from __future__ import annotations

from typing import Any

import pytest
from sdxl_test_support.chart_render import CHART, HelmError, render, run_helm

REFUSED_BY_SCHEMA: list[tuple[dict[str, Any], str]] = [
    ({"accelerator": {"type": "fpga"}}, "/accelerator/type"),
    ({"accelerator": {"tpu": {"topology": "4x4"}}}, "/accelerator/tpu/topology"),
    ({"accelerator": {"gpu": {"count": 0}}}, "/accelerator/gpu/count"),
    ({"model": {"source": "s3"}}, "/model/source"),
    ({"compilationCache": {"type": "hostPath"}}, "/compilationCache/type"),
    ({"server": {"resolutions": ["1024"]}}, "/server/resolutions/0"),
    ({"server": {"resolutions": []}}, "/server/resolutions"),
    ({"server": {"slotsPerDevice": 0}}, "/server/slotsPerDevice"),
    ({"server": {"slotsPerDevice": "many"}}, "/server/slotsPerDevice"),
    ({"server": {"memoryFraction": 1.5}}, "/server/memoryFraction"),
    ({"server": {"maxDecodeBatch": 0}}, "/server/maxDecodeBatch"),
    ({"server": {"attention": "fast"}}, "/server/attention"),
    ({"server": {"maxQueue": "lots"}}, "/server/maxQueue"),
    ({"server": {"policy": "fifo"}}, "/server/policy"),
    ({"metrics": {"backend": "datadog"}}, "/metrics/backend"),
    ({"autoscaling": {"targetLoad": 0}}, "/autoscaling/targetLoad"),
    (
        {"autoscaling": {"behavior": {"scaleUp": {"selectPolicy": "Fastest"}}}},
        "/autoscaling/behavior/scaleUp",
    ),
    ({"podSecurityContext": {"runAsUser": 0}}, "/podSecurityContext/runAsUser"),
    ({"image": {"digest": "latest"}}, "/image/digest"),
    ({"updateStrategy": {"maxUnavailable": 0}}, "/updateStrategy/maxUnavailable"),
    ({"replicas": 2}, "additional properties 'replicas' not allowed"),
    ({"server": {"maxQueueSize": 8}}, "additional properties 'maxQueueSize' not allowed"),
]

REFUSED_BY_TEMPLATE: list[tuple[dict[str, Any], str]] = [
    (
        {"terminationGracePeriodSeconds": 60},
        "terminationGracePeriodSeconds (60) must exceed server.drainSeconds",
    ),
    ({"server": {"drainSeconds": 120}}, "must exceed server.drainSeconds + preStopSleepSeconds (125)"),
    ({"model": {"source": "gcsFuse"}}, "model.gcsFuse.bucket is required"),
    ({"model": {"source": "pvc"}}, "model.pvc.claimName is required"),
    ({"compilationCache": {"type": "gcsFuse"}}, "compilationCache.gcsFuse.bucket is required"),
    ({"compilationCache": {"type": "pvc"}}, "compilationCache.pvc.claimName is required"),
    ({"auth": {"enabled": True}}, "auth.existingSecret is required"),
    ({"metrics": {"backend": "none"}}, "autoscaling.enabled needs metrics.backend"),
    ({"autoscaling": {"minReplicas": 5, "maxReplicas": 2}}, "autoscaling.minReplicas (5) must not exceed"),
    ({"server": {"defaultSteps": 60}}, "server.defaultSteps (60) must not exceed server.maxSteps (50)"),
]


def _refusal(values: dict[str, Any]) -> str:
    with pytest.raises(HelmError) as refused:
        render(values)
    return str(refused.value)


@pytest.mark.parametrize(("values", "names"), REFUSED_BY_SCHEMA, ids=lambda v: str(v)[:40])
def test_schema_refuses_invalid_value(values: dict[str, Any], names: str) -> None:
    message = _refusal(values)
    assert "values don't meet the specifications of the schema" in message
    assert names in message


@pytest.mark.parametrize(("values", "names"), REFUSED_BY_TEMPLATE, ids=lambda v: str(v)[:40])
def test_template_refuses_inconsistent_values(values: dict[str, Any], names: str) -> None:
    assert names in _refusal(values)


def test_lint_reports_the_invalid_value_too() -> None:
    with pytest.raises(HelmError) as refused:
        run_helm("lint", "--strict", str(CHART), values={"server": {"policy": "fifo"}})
    assert "/server/policy" in str(refused.value)
