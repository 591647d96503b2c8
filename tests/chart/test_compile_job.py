"""compilationCache.aheadOfTime: a Job on a CPU node fills the shared cache with the pods' executables."""

from __future__ import annotations

from typing import Any

import pytest
from sdxl_test_support.chart_render import HelmError, objects_of_kind, one, render, render_value_set

PRODUCTION = "gke-tpu-production"


def _compile_job(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    """The compile Job (the pre-install memory check is a Job too: templates/fit-check-job.yaml)."""
    (job,) = _compile_jobs(manifests)
    return job


def _compile_jobs(manifests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    jobs = objects_of_kind(manifests, "Job")
    return [j for j in jobs if j["metadata"]["labels"]["app.kubernetes.io/component"] == "compile"]


def _job_pod(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    return _compile_job(manifests)["spec"]["template"]["spec"]


def test_the_job_compiles_the_pods_settings_for_their_slice_into_their_cache() -> None:
    manifests = render_value_set(PRODUCTION)
    job = _job_pod(manifests)
    server = one(manifests, "Deployment")["spec"]["template"]["spec"]
    (container,) = job["containers"]
    args = container["args"]
    assert args[0] == "compile"
    assert args[args.index("--topology") + 1] == "v5e:2x2"  # the pods' accelerator.tpu.topology
    (server_container,) = server["containers"]
    # The same settings (ConfigMap) and the same cache volume, mounted where the servers mount it.
    assert container["envFrom"] == server_container["envFrom"]
    cache_mount = next(m for m in container["volumeMounts"] if m["name"] == "compilation-cache")
    server_mount = next(m for m in server_container["volumeMounts"] if m["name"] == "compilation-cache")
    assert args[args.index("--cache-dir") + 1] == cache_mount["mountPath"] == server_mount["mountPath"]
    volumes = {v["name"]: v for v in job["volumes"]}
    server_volumes = {v["name"]: v for v in server["volumes"]}
    assert volumes["compilation-cache"] == server_volumes["compilation-cache"]
    assert volumes["model"] == server_volumes["model"]
    assert container["image"] == server_container["image"]  # the TPU flavour: libtpu is in the key


def test_the_job_needs_no_tpu() -> None:
    job = _job_pod(render_value_set(PRODUCTION))
    (container,) = job["containers"]
    assert "google.com/tpu" not in str(container["resources"])
    assert "gke-tpu" not in str(job.get("nodeSelector", {}))
    assert job["restartPolicy"] == "Never"


def test_changed_settings_make_a_new_job() -> None:
    """A Job's pod template cannot change: new settings (new programs) are a Job of another name."""
    values = {
        "compilationCache": {"type": "pvc", "pvc": {"claimName": "cache"}, "aheadOfTime": {"enabled": True}}
    }
    before = _compile_job(render(values))["metadata"]["name"]
    after = _compile_job(render({**values, "server": {"slotsPerDevice": 2}}))["metadata"]["name"]
    assert before != after
    assert before == _compile_job(render(values))["metadata"]["name"]  # and the same settings the same Job


def test_the_servers_extra_environment_reaches_the_job_and_a_change_of_it_makes_a_new_job() -> None:
    """Compiler flags (LIBTPU_INIT_ARGS) are part of the programs' key: compiled without the pods' flags,
    no pod could load what the Job wrote."""
    flags = [{"name": "LIBTPU_INIT_ARGS", "value": "--xla_tpu_enable_latency_hiding_scheduler=true"}]
    values = {
        "compilationCache": {"type": "pvc", "pvc": {"claimName": "cache"}, "aheadOfTime": {"enabled": True}},
    }
    manifests = render({**values, "extraEnv": flags})
    (container,) = _job_pod(manifests)["containers"]
    (server_container,) = one(manifests, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert flags[0] in container["env"] and flags[0] in server_container["env"]
    assert _compile_job(manifests)["metadata"]["name"] != _compile_job(render(values))["metadata"]["name"]


def test_off_by_default() -> None:
    assert _compile_jobs(render_value_set("defaults")) == []


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"compilationCache": {"aheadOfTime": {"enabled": True}}}, "compilationCache.type"),
        (
            {
                "accelerator": {"type": "cpu"},
                "compilationCache": {
                    "type": "pvc",
                    "pvc": {"claimName": "c"},
                    "aheadOfTime": {"enabled": True},
                },
            },
            "accelerator.type",
        ),
    ],
)
def test_a_job_that_could_not_help_is_refused_naming_the_value(values: dict[str, Any], named: str) -> None:
    with pytest.raises(HelmError, match=named.replace(".", r"\.")):
        render(values)
