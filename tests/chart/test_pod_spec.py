"""The server pod: accelerator scheduling, probes, shutdown timing, rollout and hardening."""

from __future__ import annotations

import pytest
from sdxl_test_support.chart_render import (
    mounts_by_name,
    one,
    pod_spec,
    render_value_set,
    server_container,
    server_settings,
    volumes_by_name,
)

GRPC_PORT = 50051
CHIPS_BY_TOPOLOGY = {"tpu-1x1": ("1x1", 1), "defaults": ("2x2", 4), "tpu-2x4": ("2x4", 8)}


@pytest.mark.parametrize("value_set", sorted(CHIPS_BY_TOPOLOGY))
def test_tpu_pod_lands_on_its_slice_and_requests_all_its_chips(value_set: str) -> None:
    topology, chips = CHIPS_BY_TOPOLOGY[value_set]
    manifests = render_value_set(value_set)
    spec = pod_spec(manifests)
    assert spec["nodeSelector"]["cloud.google.com/gke-tpu-accelerator"] == "tpu-v5-lite-podslice"
    assert spec["nodeSelector"]["cloud.google.com/gke-tpu-topology"] == topology
    resources = server_container(manifests)["resources"]
    assert resources["requests"]["google.com/tpu"] == chips
    assert resources["limits"]["google.com/tpu"] == chips
    assert {"key": "google.com/tpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]


def test_gpu_pod_requests_gpus_and_no_tpu() -> None:
    manifests = render_value_set("gpu")
    spec = pod_spec(manifests)
    resources = server_container(manifests)["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == 2
    assert spec["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    assert [t["key"] for t in spec["tolerations"]] == ["nvidia.com/gpu"]
    assert "google.com/tpu" not in resources["limits"]


def test_cpu_pod_schedules_anywhere() -> None:
    manifests = render_value_set("cpu")
    spec = pod_spec(manifests)
    resources = server_container(manifests)["resources"]
    assert "nodeSelector" not in spec
    assert "tolerations" not in spec
    assert set(resources["limits"]) == {"memory"}
    assert server_settings(manifests)["SDXL_MODEL"] == "demo"


def test_extra_selectors_and_tolerations_add_to_the_accelerator_ones() -> None:
    spec = pod_spec(render_value_set("everything-optional"))
    assert spec["nodeSelector"]["example.com/pool"] == "tpu"
    assert spec["nodeSelector"]["cloud.google.com/gke-tpu-topology"] == "2x2"
    assert [t["key"] for t in spec["tolerations"]] == ["google.com/tpu", "dedicated"]


@pytest.mark.parametrize("value_set", ["defaults", "gpu", "cpu"])
def test_probes_use_grpc_health_on_the_grpc_port(value_set: str) -> None:
    container = server_container(render_value_set(value_set))
    assert {"name": "grpc", "containerPort": GRPC_PORT, "protocol": "TCP"} in container["ports"]
    assert {"name": "metrics", "containerPort": 8000, "protocol": "TCP"} in container["ports"]
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container[kind]
        assert set(probe) & {"httpGet", "tcpSocket", "exec"} == set(), kind
        assert probe["grpc"]["port"] == GRPC_PORT, kind
    # Readiness asks for the image service itself, which is NOT_SERVING while warming up or draining.
    assert container["readinessProbe"]["grpc"]["service"] == "sdxl.v1.ImageService"


def test_startup_probe_allows_a_cold_compile() -> None:
    probe = server_container(render_value_set("defaults"))["startupProbe"]
    budget_minutes = probe["periodSeconds"] * probe["failureThreshold"] / 60
    assert budget_minutes >= 20, f"startup budget is only {budget_minutes} minutes"


@pytest.mark.parametrize("value_set", ["defaults", "everything-optional"])
def test_termination_grace_exceeds_prestop_plus_drain(value_set: str) -> None:
    manifests = render_value_set(value_set)
    drain = float(server_settings(manifests)["SDXL_DRAIN_SECONDS"])
    container = server_container(manifests)
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    assert pod_spec(manifests)["terminationGracePeriodSeconds"] > pre_stop + drain


def test_prestop_keeps_serving_while_endpoints_update() -> None:
    container = server_container(render_value_set("defaults"))
    assert container["lifecycle"]["preStop"]["sleep"]["seconds"] > 0
    assert "lifecycle" not in server_container(render_value_set("everything-optional"))


def test_rollout_never_needs_extra_accelerators() -> None:
    rolling = one(render_value_set("defaults"), "Deployment")["spec"]["strategy"]
    assert rolling["type"] == "RollingUpdate"
    assert rolling["rollingUpdate"]["maxSurge"] == 0
    recreate = one(render_value_set("everything-optional"), "Deployment")["spec"]["strategy"]
    assert recreate == {"type": "Recreate"}


@pytest.mark.parametrize("value_set", ["defaults", "cpu", "auth", "model-gcsfuse"])
def test_pod_runs_hardened(value_set: str) -> None:
    manifests = render_value_set(value_set)
    spec = pod_spec(manifests)
    container = server_container(manifests)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    hardening = container["securityContext"]
    assert hardening["readOnlyRootFilesystem"] is True
    assert hardening["allowPrivilegeEscalation"] is False
    assert hardening["capabilities"] == {"drop": ["ALL"]}
    assert "privileged" not in hardening
    # With a read-only root, /tmp must be a writable volume (and HOME points there).
    assert mounts_by_name(manifests)["tmp"]["mountPath"] == "/tmp"
    assert "emptyDir" in volumes_by_name(manifests)["tmp"]
    assert {"name": "HOME", "value": "/tmp"} in container["env"]


def test_server_settings_reach_the_pod_through_the_configmap() -> None:
    manifests = render_value_set("defaults")
    configmap = one(manifests, "ConfigMap")
    sources = server_container(manifests)["envFrom"]
    assert sources == [{"configMapRef": {"name": configmap["metadata"]["name"]}}]
    settings = configmap["data"]
    assert settings["SDXL_PORT"] == "50051"
    assert settings["SDXL_RESOLUTIONS"] == "1024x1024"
    assert settings["SDXL_POLICY"] == "continuous"
    assert all(key.startswith("SDXL_") for key in settings)
    multi = server_settings(render_value_set("everything-optional"))
    assert multi["SDXL_RESOLUTIONS"] == "1024x1024,1152x896"
    assert multi["SDXL_LOG_PROMPTS"] == "1"


def test_config_change_rolls_the_pods() -> None:
    def checksum(value_set: str) -> str:
        template = one(render_value_set(value_set), "Deployment")["spec"]["template"]
        return str(template["metadata"]["annotations"]["checksum/config"])

    assert checksum("defaults") == checksum("tpu-2x4")  # same server settings
    assert checksum("defaults") != checksum("everything-optional")  # other resolutions


@pytest.mark.parametrize(
    ("value_set", "tag"), [("defaults", ":0.1.0-tpu"), ("gpu", ":0.1.0-cuda"), ("cpu", ":0.1.0-cpu")]
)
def test_image_flavour_follows_the_accelerator(value_set: str, tag: str) -> None:
    assert server_container(render_value_set(value_set))["image"] == f"ghcr.io/sdxl-serve/sdxl-server{tag}"


def test_digest_pins_the_image() -> None:
    image = server_container(render_value_set("everything-optional"))["image"]
    assert image == "ghcr.io/sdxl-serve/sdxl-server@sha256:" + "ab" * 32
