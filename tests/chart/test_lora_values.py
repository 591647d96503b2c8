"""The chart's `lora` values: the adapter folder mounted read-only (GCS FUSE or a claim) and passed as
`--lora-dir`, the adapter bank's size as `--lora-places` / `--lora-max-rank` (defaults the server's own),
adapters merged at start passed as `--fuse-lora`, each as a server setting the server has; a source
without its bucket or claim, or a bad value, refused naming it."""

from __future__ import annotations

import pytest
from sdxl_server.engine.adapters.fuse_spec import FusedLora, parse_fused_loras
from sdxl_server.engine.settings import EngineConfig
from sdxl_server.server_settings import OPTIONS, parse_serve_config
from sdxl_test_support.chart_render import (
    HelmError,
    mounts_by_name,
    one,
    render,
    render_value_set,
    server_settings,
    volumes_by_name,
)

SERVER_VARIABLES = {option.env for option in OPTIONS}


def test_by_default_no_adapter_folder_is_mounted_or_named() -> None:
    manifests = render_value_set("defaults")
    assert "lora" not in volumes_by_name(manifests)
    settings = server_settings(manifests)
    assert not {"SDXL_LORA_DIR", "SDXL_MAX_LORAS_PER_REQUEST", "SDXL_FUSE_LORA", "SDXL_LORA_PLACES"} & set(
        settings
    )


def test_a_bucket_of_adapters_is_a_read_only_gcsfuse_mount_named_to_the_server() -> None:
    manifests = render(
        {
            "lora": {
                "source": "gcsFuse",
                "gcsFuse": {"bucket": "adapters", "path": "sdxl/"},
                "maxPerRequest": 3,
                "fuse": ["/loras/lightning-4step.safetensors:1.0", "/loras/style.safetensors"],
            }
        }
    )
    volume = volumes_by_name(manifests)["lora"]["csi"]
    assert volume["readOnly"] is True and volume["volumeAttributes"]["bucketName"] == "adapters"
    assert volume["volumeAttributes"]["mountOptions"] == "implicit-dirs,only-dir=sdxl"
    mount = mounts_by_name(manifests)["lora"]
    assert mount["readOnly"] is True and mount["mountPath"] == "/loras"
    settings = server_settings(manifests)
    assert settings["SDXL_LORA_DIR"] == "/loras"
    assert settings["SDXL_MAX_LORAS_PER_REQUEST"] == "3"
    assert parse_fused_loras(settings["SDXL_FUSE_LORA"]) == (
        FusedLora("/loras/lightning-4step.safetensors", 1.0),
        FusedLora("/loras/style.safetensors", 1.0),
    )
    assert {"SDXL_LORA_DIR", "SDXL_MAX_LORAS_PER_REQUEST", "SDXL_FUSE_LORA"} <= SERVER_VARIABLES
    annotations = one(manifests, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["gke-gcsfuse/volumes"] == "true"  # the driver's sidecar is injected


def test_the_adapter_banks_size_reaches_the_server_with_the_servers_defaults(tmp_path) -> None:
    claim = {"source": "pvc", "pvc": {"claimName": "loras"}}

    def engine_settings(lora: dict) -> EngineConfig:
        settings = server_settings(render({"lora": {**claim, **lora}}))
        settings["SDXL_LORA_DIR"] = str(tmp_path)  # the mount exists in the pod, not here
        return parse_serve_config([], settings).engine

    sized = engine_settings({"places": 3, "maxRank": 32})
    assert (sized.lora_places, sized.lora_max_rank) == (3, 32)
    defaults = engine_settings({})
    assert (defaults.lora_places, defaults.lora_max_rank) == (
        EngineConfig.lora_places,
        EngineConfig.lora_max_rank,
    )
    assert {"SDXL_LORA_PLACES", "SDXL_LORA_MAX_RANK"} <= SERVER_VARIABLES


def test_a_claim_of_adapters_is_mounted_read_only() -> None:
    manifests = render({"lora": {"source": "pvc", "pvc": {"claimName": "loras", "subPath": "sdxl"}}})
    assert volumes_by_name(manifests)["lora"]["persistentVolumeClaim"] == {
        "claimName": "loras",
        "readOnly": True,
    }
    assert mounts_by_name(manifests)["lora"]["subPath"] == "sdxl"
    assert server_settings(manifests)["SDXL_LORA_DIR"] == "/loras"


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"lora": {"source": "gcsFuse"}}, "lora.gcsFuse.bucket is required"),
        ({"lora": {"source": "pvc"}}, "lora.pvc.claimName is required"),
        ({"lora": {"source": "s3"}}, "/lora/source"),
        ({"lora": {"maxPerRequest": -1}}, "/lora/maxPerRequest"),
        ({"lora": {"places": 0}}, "/lora/places"),
        ({"lora": {"maxRank": 0}}, "/lora/maxRank"),
        ({"lora": {"fuse": ["relative.safetensors"]}}, "/lora/fuse/0"),
    ],
)
def test_bad_lora_values_are_refused_naming_them(values, named) -> None:
    with pytest.raises(HelmError) as refused:
        render(values)
    assert named in str(refused.value)
