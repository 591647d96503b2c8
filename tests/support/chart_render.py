"""Runs the real Helm CLI on helm/sdxl-serve and hands the rendered objects to the tests.

Helm is the pinned binary that `make helm` (mk/chart.mk) installs into .tools/bin; `SDXL_HELM` may point
elsewhere. A missing Helm fails the chart tests instead of skipping them, so CI cannot pass without them.
Each value set is rendered once per test session (`render_value_set` is cached).
"""

from __future__ import annotations

import copy
import functools
import json
import os
import pathlib
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
import yaml

REPO = pathlib.Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "sdxl-serve"
EXAMPLES = CHART / "examples"
RELEASE = "sdxl-test"
NAMESPACE = "serving"

Manifest = dict[str, Any]


def _example(name: str) -> dict[str, Any]:
    return dict(yaml.safe_load((EXAMPLES / name).read_text()))


# Value sets rendered, linted and validated by every test that takes `value_set`; semantics tests pick
# the ones they need by name.
VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "tpu-1x1": {"accelerator": {"tpu": {"topology": "1x1"}}},
    "tpu-2x4": {"accelerator": {"tpu": {"topology": "2x4"}}},
    "gpu": {"accelerator": {"type": "gpu", "gpu": {"count": 2}}},
    "cpu": _example("cpu.yaml"),
    "gke-tpu-production": _example("gke-tpu-production.yaml"),
    "prometheus-adapter": {
        "metrics": {
            "backend": "prometheus-adapter",
            "serviceMonitor": {"labels": {"release": "kube-prometheus-stack"}},
        },
        "monitoring": {"rules": {"labels": {"release": "kube-prometheus-stack"}}},
    },
    "hpa-disabled": {"autoscaling": {"enabled": False}, "replicaCount": 3},
    "auth": {"auth": {"enabled": True, "existingSecret": "sdxl-token", "secretKey": "bearer"}},
    "model-hub-token": {"model": {"source": "hub", "hub": {"tokenSecret": {"name": "hf-token"}}}},
    "model-gcsfuse": {"model": {"source": "gcsFuse", "gcsFuse": {"bucket": "models", "path": "/sdxl-base/"}}},
    "model-pvc": {"model": {"source": "pvc", "pvc": {"claimName": "sdxl-weights", "subPath": "sdxl-base"}}},
    "model-tiny": {"model": {"source": "tiny"}},
    "cache-gcsfuse": {
        "compilationCache": {"type": "gcsFuse", "gcsFuse": {"bucket": "jax-cache", "path": "v5e"}}
    },
    "cache-pvc": {"compilationCache": {"type": "pvc", "pvc": {"claimName": "jax-cache", "subPath": "v5e"}}},
    "everything-optional": {
        "networkPolicy": {
            "enabled": True,
            "grpcFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "frontend"}}}],
            "metricsFrom": [
                {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "gmp-system"}}}
            ],
        },
        "serviceAccount": {"gcpServiceAccount": "sdxl-serve@my-project.iam.gserviceaccount.com"},
        "updateStrategy": {"type": "Recreate"},
        "server": {"logPrompts": True, "resolutions": ["1024x1024", "1152x896"]},
        "extraEnv": [{"name": "LIBTPU_INIT_ARGS", "value": "--xla_tpu_enable_async_collective_fusion"}],
        "podAnnotations": {"example.com/team": "imaging"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "sdxl", "effect": "NoSchedule"}],
        "nodeSelector": {"example.com/pool": "tpu"},
        "priorityClassName": "inference",
        "imagePullSecrets": [{"name": "regcred"}],
        "image": {"digest": "sha256:" + "ab" * 32},
        "service": {"headless": {"enabled": False}},
        "metrics": {"gmp": {"clusterName": "prod-us-east5"}},
        "monitoring": {"dashboard": {"enabled": True, "folder": "Serving"}},
        "preStopSleepSeconds": 0,
    },
}


class HelmError(Exception):
    """Helm exited non-zero; the message is its stderr, then its stdout (where `helm lint` reports)."""


def helm_binary() -> pathlib.Path:
    helm = pathlib.Path(os.environ.get("SDXL_HELM") or REPO / ".tools" / "bin" / "helm")
    if not os.access(helm, os.X_OK):
        pytest.fail(
            f"Helm not found at {helm}: run `make helm` (make test does it) or set SDXL_HELM", pytrace=False
        )
    return helm


@functools.cache
def _helm_home() -> str:
    # Keep Helm's cache/config/data out of the user's home so that tests are hermetic.
    return tempfile.mkdtemp(prefix="sdxl-helm-home-")


def run_helm(*args: str, values: Mapping[str, Any] | None = None) -> str:
    """Runs `helm ARGS [-f values]` and returns stdout; raises HelmError on failure."""
    home = _helm_home()
    env = {
        **os.environ,
        "HELM_CACHE_HOME": f"{home}/cache",
        "HELM_CONFIG_HOME": f"{home}/config",
        "HELM_DATA_HOME": f"{home}/data",
    }
    command = [str(helm_binary()), *args]
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as values_file:
        if values is not None:
            json.dump(values, values_file)  # JSON is YAML
            values_file.flush()
            command += ["-f", values_file.name]
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120, check=False)
    if result.returncode != 0:
        raise HelmError(f"{result.stderr.strip()}\n{result.stdout.strip()}".strip())
    return result.stdout


def render(values: Mapping[str, Any], *extra_args: str) -> list[Manifest]:
    """`helm template` with the given values: every object, the `helm test` pod included."""
    text = run_helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, *extra_args, values=values)
    return [doc for doc in yaml.safe_load_all(text) if doc]


@functools.cache
def _render_value_set(name: str) -> tuple[Manifest, ...]:
    return tuple(render(VALUE_SETS[name]))


def render_value_set(name: str) -> list[Manifest]:
    """The rendering of a named value set; a deep copy, so that a test cannot disturb another."""
    return copy.deepcopy(list(_render_value_set(name)))


def objects_of_kind(manifests: list[Manifest], kind: str) -> list[Manifest]:
    return [m for m in manifests if m["kind"] == kind]


def one(manifests: list[Manifest], kind: str, name_suffix: str = "") -> Manifest:
    """The single object of `kind` (whose name ends with `name_suffix`, when given). Without a suffix the
    headroom placeholders (`<fullname>-headroom`, a second Deployment) are not counted: the server's is
    meant."""
    found = [
        m
        for m in objects_of_kind(manifests, kind)
        if m["metadata"]["name"].endswith(name_suffix)
        and (name_suffix or not m["metadata"]["name"].endswith("-headroom"))
    ]
    assert len(found) == 1, (
        f"expected one {kind}*{name_suffix}, found {[m['metadata']['name'] for m in found]}"
    )
    return found[0]


def is_helm_test(manifest: Manifest) -> bool:
    return manifest["metadata"].get("annotations", {}).get("helm.sh/hook") == "test"


def server_container(manifests: list[Manifest]) -> Manifest:
    pod = one(manifests, "Deployment")["spec"]["template"]["spec"]
    containers = [c for c in pod["containers"] if c["name"] == "server"]
    assert len(containers) == 1
    return containers[0]


def pod_spec(manifests: list[Manifest]) -> Manifest:
    return one(manifests, "Deployment")["spec"]["template"]["spec"]


def volumes_by_name(manifests: list[Manifest]) -> dict[str, Manifest]:
    return {v["name"]: v for v in pod_spec(manifests)["volumes"]}


def mounts_by_name(manifests: list[Manifest]) -> dict[str, Manifest]:
    return {m["name"]: m for m in server_container(manifests)["volumeMounts"]}


def server_settings(manifests: list[Manifest]) -> dict[str, str]:
    """The SDXL_* environment the server gets from its ConfigMap."""
    # The ConfigMap the server container takes its environment from (the dashboard is a ConfigMap too).
    sources = server_container(manifests)["envFrom"]
    [name] = [source["configMapRef"]["name"] for source in sources if "configMapRef" in source]
    config_maps = objects_of_kind(manifests, "ConfigMap")
    return dict(next(m for m in config_maps if m["metadata"]["name"] == name)["data"])


def iter_probes(container: Manifest) -> Iterator[tuple[str, Manifest]]:
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        yield kind, container[kind]
