"""Model sources, compilation cache volumes, the auth token Secret and the Workload Identity account."""

from __future__ import annotations

from sdxl_test_support.chart_render import (
    mounts_by_name,
    one,
    pod_spec,
    render_value_set,
    server_container,
    server_settings,
    volumes_by_name,
)

GCSFUSE_DRIVER = "gcsfuse.csi.storage.gke.io"


def _pod_annotations(value_set: str) -> dict[str, str]:
    deployment = one(render_value_set(value_set), "Deployment")
    return dict(deployment["spec"]["template"]["metadata"]["annotations"])


def test_hub_model_downloads_into_a_sized_scratch_volume() -> None:
    manifests = render_value_set("defaults")
    assert server_settings(manifests)["SDXL_MODEL"] == "stabilityai/stable-diffusion-xl-base-1.0"
    assert volumes_by_name(manifests)["model-download"]["emptyDir"]["sizeLimit"] == "40Gi"
    assert mounts_by_name(manifests)["model-download"]["mountPath"] == "/var/cache/huggingface"
    env = {e["name"]: e for e in server_container(manifests)["env"]}
    assert env["HF_HOME"]["value"] == "/var/cache/huggingface"
    assert "HF_TOKEN" not in env
    assert "gke-gcsfuse/volumes" not in _pod_annotations("defaults")


def test_hub_token_comes_from_its_secret() -> None:
    env = {e["name"]: e for e in server_container(render_value_set("model-hub-token"))["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "token"}


def test_gcsfuse_model_is_a_read_only_bucket_mount() -> None:
    manifests = render_value_set("model-gcsfuse")
    volume = volumes_by_name(manifests)["model"]["csi"]
    assert volume["driver"] == GCSFUSE_DRIVER
    assert volume["readOnly"] is True
    assert volume["volumeAttributes"]["bucketName"] == "models"
    assert volume["volumeAttributes"]["mountOptions"] == "implicit-dirs,only-dir=sdxl-base"
    mount = mounts_by_name(manifests)["model"]
    assert mount["readOnly"] is True
    assert server_settings(manifests)["SDXL_MODEL"] == mount["mountPath"] == "/models/sdxl"
    # The GCS FUSE CSI driver only injects its sidecar into pods that carry this annotation.
    assert _pod_annotations("model-gcsfuse")["gke-gcsfuse/volumes"] == "true"
    assert "model-download" not in volumes_by_name(manifests)


def test_pvc_model_is_a_read_only_claim() -> None:
    manifests = render_value_set("model-pvc")
    claim = volumes_by_name(manifests)["model"]["persistentVolumeClaim"]
    assert claim == {"claimName": "sdxl-weights", "readOnly": True}
    mount = mounts_by_name(manifests)["model"]
    assert mount["subPath"] == "sdxl-base"
    assert server_settings(manifests)["SDXL_MODEL"] == mount["mountPath"]


def test_tiny_model_needs_no_volume() -> None:
    manifests = render_value_set("model-tiny")
    assert server_settings(manifests)["SDXL_MODEL"] == "tiny"
    assert not {"model", "model-download"} & set(volumes_by_name(manifests))


def test_default_compilation_cache_is_per_pod() -> None:
    manifests = render_value_set("defaults")
    assert "emptyDir" in volumes_by_name(manifests)["compilation-cache"]
    path = mounts_by_name(manifests)["compilation-cache"]["mountPath"]
    assert server_settings(manifests)["SDXL_COMPILATION_CACHE_DIR"] == path


def test_gcsfuse_compilation_cache_is_a_shared_writable_bucket() -> None:
    manifests = render_value_set("cache-gcsfuse")
    volume = volumes_by_name(manifests)["compilation-cache"]["csi"]
    assert volume["driver"] == GCSFUSE_DRIVER
    assert "readOnly" not in volume
    assert volume["volumeAttributes"] == {
        "bucketName": "jax-cache",
        "mountOptions": "implicit-dirs,only-dir=v5e",
    }
    assert "readOnly" not in mounts_by_name(manifests)["compilation-cache"]
    assert _pod_annotations("cache-gcsfuse")["gke-gcsfuse/volumes"] == "true"
    # fsGroup gives the non-root server write access to the mount.
    assert pod_spec(manifests)["securityContext"]["fsGroup"] == 10001


def test_pvc_compilation_cache_uses_the_claim() -> None:
    manifests = render_value_set("cache-pvc")
    assert volumes_by_name(manifests)["compilation-cache"] == {
        "name": "compilation-cache",
        "persistentVolumeClaim": {"claimName": "jax-cache"},
    }
    assert mounts_by_name(manifests)["compilation-cache"]["subPath"] == "v5e"


def test_auth_token_file_is_the_mounted_secret_key() -> None:
    manifests = render_value_set("auth")
    volume = volumes_by_name(manifests)["auth-token"]["secret"]
    assert volume["secretName"] == "sdxl-token"
    assert volume["items"] == [{"key": "bearer", "path": "bearer"}]
    mount = mounts_by_name(manifests)["auth-token"]
    assert mount["readOnly"] is True
    assert server_settings(manifests)["SDXL_AUTH_TOKEN_FILE"] == f"{mount['mountPath']}/bearer"


def test_auth_is_off_by_default() -> None:
    manifests = render_value_set("defaults")
    assert "SDXL_AUTH_TOKEN_FILE" not in server_settings(manifests)
    assert "auth-token" not in volumes_by_name(manifests)


def test_workload_identity_annotation_binds_the_google_account() -> None:
    manifests = render_value_set("everything-optional")
    account = one(manifests, "ServiceAccount")
    email = "sdxl-serve@my-project.iam.gserviceaccount.com"
    assert account["metadata"]["annotations"]["iam.gke.io/gcp-service-account"] == email
    assert pod_spec(manifests)["serviceAccountName"] == account["metadata"]["name"]
    assert "annotations" not in one(render_value_set("defaults"), "ServiceAccount")["metadata"]
