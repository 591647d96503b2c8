"""The chart lints cleanly and every object it renders is valid Kubernetes, for every value set.

Built-in kinds are validated with kubernetes-validate in strict mode (unknown fields are errors) against
the oldest Kubernetes the chart supports (1.30) and the newest that kubernetes-validate knows. A kind it has
no schema for is a failure, except the CRD kinds (monitoring objects), which are checked against the small
schemas in tests/chart/schemas/ (the CRDs themselves are not part of any Kubernetes release).
"""

from __future__ import annotations

import json
import pathlib

import jsonschema
import kubernetes_validate
import pytest
from sdxl_test_support.chart_render import (
    CHART,
    VALUE_SETS,
    HelmError,
    Manifest,
    render,
    render_value_set,
    run_helm,
)

OLDEST_KUBERNETES = "1.30.0"
NEWEST_KUBERNETES = str(kubernetes_validate.latest_version())
CRD_SCHEMAS = {
    ("monitoring.googleapis.com/v1", "PodMonitoring"): "podmonitoring.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor.json",
    ("monitoring.googleapis.com/v1", "Rules"): "gmp-rules.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule.json",
}
SCHEMA_DIR = pathlib.Path(__file__).parent / "schemas"


def _crd_validator(api_version: str, kind: str) -> jsonschema.Draft202012Validator | None:
    file = CRD_SCHEMAS.get((api_version, kind))
    if file is None:
        return None
    return jsonschema.Draft202012Validator(json.loads((SCHEMA_DIR / file).read_text()))


def _describe(manifest: Manifest) -> str:
    return f"{manifest['kind']}/{manifest['metadata']['name']}"


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_lint_strict_passes(value_set: str) -> None:
    output = run_helm("lint", "--strict", str(CHART), values=VALUE_SETS[value_set])
    assert "0 chart(s) failed" in output


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
@pytest.mark.parametrize("version", [OLDEST_KUBERNETES, NEWEST_KUBERNETES])
def test_every_object_validates(value_set: str, version: str) -> None:
    manifests = render_value_set(value_set)
    assert manifests, "nothing rendered"
    for manifest in manifests:
        crd = _crd_validator(manifest["apiVersion"], manifest["kind"])
        if crd is not None:
            errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in crd.iter_errors(manifest)]
            assert not errors, f"{_describe(manifest)}: {errors}"
            continue
        try:
            kubernetes_validate.validate(manifest, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(map(str, e.path))
            pytest.fail(
                f"{value_set}: {_describe(manifest)} invalid for Kubernetes {version}: {path}: {e.message}"
            )
        except kubernetes_validate.SchemaNotFoundError:
            api = manifest["apiVersion"]
            pytest.fail(f"{value_set}: {_describe(manifest)} ({api}) is not a Kubernetes {version} kind")


def test_crd_schemas_reject_a_broken_object() -> None:
    # The small CRD schemas must bite: a misspelled field is caught, as kubernetes-validate would catch it.
    pod_monitoring = next(m for m in render_value_set("defaults") if m["kind"] == "PodMonitoring")
    pod_monitoring["spec"]["endpoints"][0]["intervall"] = "15s"
    validator = _crd_validator("monitoring.googleapis.com/v1", "PodMonitoring")
    assert validator is not None
    assert any("intervall" in e.message for e in validator.iter_errors(pod_monitoring))


def test_objects_are_namespaced_in_the_release_namespace() -> None:
    # `helm template --namespace` and `kubectl apply -f k8s/` must put every object in the same place.
    # The headroom placeholders' PriorityClass is cluster-scoped (named after the release instead).
    for manifest in render_value_set("everything-optional"):
        if manifest["kind"] == "PriorityClass":
            assert "namespace" not in manifest["metadata"], _describe(manifest)
            continue
        assert manifest["metadata"]["namespace"] == "serving", _describe(manifest)


def test_kubernetes_older_than_1_30_is_refused() -> None:
    # The chart uses the preStop sleep action and PDB unhealthyPodEvictionPolicy (1.30+).
    with pytest.raises(HelmError, match="kubeVersion"):
        render({}, "--kube-version", "1.29.0")
