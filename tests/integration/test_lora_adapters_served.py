"""A real server with `--lora-dir`: GetServerInfo lists the folder's adapters (usable with their rank, or
unusable with the reason), a file dropped in while serving is found without a restart and served, and
both doors refuse the same requests the same way: an unknown name is NOT_FOUND naming it, too many
adapters or a scale out of bounds is INVALID_ARGUMENT naming the field; a LoCon adapter (usable merged
at start) is refused per request with the reason. The images' equality with merged weights is
tests/unit/engine/adapters/test_adapters_per_request.py's.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import grpc
import pytest
from sdxl_client._proto.sdxl.v1 import sdxl_pb2
from sdxl_test_support.grpc_details import bad_request_fields, image_stub
from sdxl_test_support.lora_writers import random_layers, write_diffusers, write_kohya


@pytest.fixture(scope="module")
def lora_folder(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    layers = random_layers(tiny_model_dir, rank=4, seed=1)
    write_kohya(tiny_model_dir, layers, folder / "style.safetensors", original_unet_names=True)
    unet_only = random_layers(tiny_model_dir, rank=8, seed=2, components=("unet",), every=2)
    write_diffusers(tiny_model_dir, unet_only, folder / "detail.safetensors")
    locon = random_layers(tiny_model_dir, rank=2, seed=4, components=("unet",), convolutions=True)
    write_kohya(tiny_model_dir, locon, folder / "locon.safetensors")
    (folder / "broken.safetensors").write_bytes(b"half a download")
    return folder


@pytest.fixture(scope="module")
def server(module_server_factory, lora_folder):
    # One of the shared server's resolutions: its compiled programs are loaded, not compiled again.
    return module_server_factory(
        "--lora-dir", str(lora_folder), "--max-loras-per-request", "2", "--http-port", "0",
        "--resolutions", "64x64",
    )  # fmt: skip


def _info(server) -> sdxl_pb2.ServerInfo:
    with server.channel() as channel:
        return image_stub(channel).GetServerInfo(sdxl_pb2.GetServerInfoRequest(), timeout=30)


def _generate(server, *loras: sdxl_pb2.LoraRef) -> grpc.RpcError:
    request = sdxl_pb2.GenerateRequest(prompt="a cat", steps=1, loras=list(loras))
    with server.channel() as channel, pytest.raises(grpc.RpcError) as refused:
        image_stub(channel).Generate(request, timeout=60)
    return refused.value


def _http(server, loras: list[dict]) -> tuple[int, dict]:
    body = json.dumps({"prompt": "a cat", "steps": 1, "loras": loras}).encode()
    url = f"http://127.0.0.1:{server.http_port}/v1/images/generations"
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.slow
def test_server_info_lists_the_folders_adapters(server):
    info = _info(server)
    adapters = {adapter.name: adapter for adapter in info.adapters}
    assert sorted(adapters) == ["broken", "detail", "locon", "style"]
    assert (adapters["style"].usable, adapters["style"].rank) == (True, 4)
    assert (adapters["detail"].usable, adapters["detail"].rank) == (True, 8)
    assert not adapters["broken"].usable
    assert "not a readable safetensors file" in adapters["broken"].reason
    assert not adapters["locon"].usable  # fits the model (it could be fused), not the adapter bank
    assert "convolution (LoCon)" in adapters["locon"].reason and "--fuse-lora" in adapters["locon"].reason
    assert (info.max_loras_per_request, info.min_lora_scale, info.max_lora_scale) == (2, -2.0, 2.0)
    unusable = [e for e in server.log_entries() if "broken" in str(e.get("message", ""))]
    assert len(unusable) == 1 and "unusable" in str(unusable[0]["message"])


@pytest.mark.slow
def test_an_adapter_dropped_in_while_serving_is_found_and_served_without_a_restart(
    server, lora_folder, tiny_model_dir
):
    assert "late" not in {adapter.name for adapter in _info(server).adapters}
    late = random_layers(tiny_model_dir, seed=3, components=("unet",))
    write_diffusers(tiny_model_dir, late, lora_folder / "late.safetensors")
    late_ref = sdxl_pb2.LoraRef(name="late", scale=0.5)
    request = sdxl_pb2.GenerateRequest(prompt="a cat", steps=2, loras=[late_ref])
    with server.channel() as channel:
        response = image_stub(channel).Generate(request, timeout=120)
    assert len(response.images) == 1 and response.images[0].data
    adapters = {adapter.name: adapter for adapter in _info(server).adapters}
    assert adapters["late"].usable and adapters["late"].rank == 4
    loads = [
        e for e in server.log_entries() if "LoRA adapter late loaded into place" in str(e.get("message"))
    ]
    assert len(loads) == 1


@pytest.mark.slow
def test_an_adapter_the_bank_cannot_hold_is_refused_per_request_with_the_reason(server):
    refused = _generate(server, sdxl_pb2.LoraRef(name="locon"))
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    reason = bad_request_fields(refused)["loras[0].name"]
    assert "convolution (LoCon)" in reason and "--fuse-lora" in reason


@pytest.mark.slow
def test_an_unknown_adapter_is_not_found_naming_it_on_both_doors(server):
    refused = _generate(server, sdxl_pb2.LoraRef(name="style"), sdxl_pb2.LoraRef(name="no-such-lora"))
    assert refused.code() == grpc.StatusCode.NOT_FOUND
    assert "loras[1].name" in refused.details() and "'no-such-lora'" in refused.details()
    status, body = _http(server, [{"name": "no-such-lora"}])
    assert status == 404
    assert "'no-such-lora'" in body["error"]["message"] and body["error"]["code"] == "not_found"


@pytest.mark.slow
def test_too_many_adapters_or_a_scale_out_of_bounds_name_the_field_on_both_doors(server):
    three = [sdxl_pb2.LoraRef(name=name) for name in ("style", "detail", "late")]
    refused = _generate(server, *three)
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(refused) == {"loras": "3 adapters; at most 2 per request"}
    status, body = _http(server, [{"name": name} for name in ("style", "detail", "late")])
    assert (status, body["error"]["param"]) == (400, "loras")

    refused = _generate(server, sdxl_pb2.LoraRef(name="style", scale=2.5))
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(refused) == {"loras[0].scale": "2.5 is outside -2..2"}
    status, body = _http(server, [{"name": "style", "scale": 2.5}])
    assert (status, body["error"]["param"]) == (400, "loras[0].scale")

    status, body = _http(server, [{"name": "style", "strength": 1}])  # the JSON shape is the door's
    assert (status, body["error"]["param"]) == (400, "loras")


@pytest.mark.slow
def test_an_unusable_adapter_is_refused_with_its_reason(server):
    refused = _generate(server, sdxl_pb2.LoraRef(name="broken"))
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a readable safetensors file" in bad_request_fields(refused)["loras[0].name"]
