"""Each RPC of sdxl.v1.ImageService on a real server with the tiny model; validation; reflection; metrics."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from sdxl_client._proto.sdxl.v1 import sdxl_pb2, sdxl_pb2_grpc
from sdxl_test_support.grpc_details import bad_request_fields, decode, image_stub
from sdxl_test_support.metrics_page import metric_samples, sample


@pytest.fixture(scope="module")
def stub(shared_server) -> Iterator[sdxl_pb2_grpc.ImageServiceStub]:
    with shared_server.channel() as channel:
        yield image_stub(channel)


def test_server_info_describes_the_model_and_limits(stub) -> None:
    info = stub.GetServerInfo(sdxl_pb2.GetServerInfoRequest(), timeout=30)
    assert info.model == "tiny"
    assert [(r.width, r.height) for r in info.resolutions] == [(64, 64), (128, 64)]
    assert (info.max_steps, info.default_steps) == (20, 4)
    assert info.max_prompt_tokens == 77
    assert info.slots >= 1 and info.devices >= 1
    assert info.engines == 1  # one engine steps every device (no --engine-per-device)
    assert set(info.formats) == {sdxl_pb2.PNG, sdxl_pb2.JPEG, sdxl_pb2.WEBP}
    assert info.policy == "continuous"


def test_generate_returns_decodable_images_of_the_requested_size_and_format(stub) -> None:
    request = sdxl_pb2.GenerateRequest(
        prompt="a red cube",
        num_images=2,
        steps=2,
        width=128,
        height=64,
        format=sdxl_pb2.JPEG,
        seed=7,
        request_id="rpc-test-1",
    )
    response = stub.Generate(request, timeout=120)
    assert response.request_id == "rpc-test-1"
    assert (response.seed, response.steps) == (7, 2)
    assert [(image.index, image.seed) for image in response.images] == [(0, 7), (1, 8)]
    for image in response.images:
        decoded = decode(image)
        assert decoded.format == "JPEG" and decoded.size == (128, 64)
        assert (image.width, image.height, image.format) == (128, 64, sdxl_pb2.JPEG)
    assert response.timings.total_seconds > 0
    assert not response.prompt_truncated


def test_generate_applies_the_servers_defaults(stub) -> None:
    response = stub.Generate(sdxl_pb2.GenerateRequest(prompt="defaults"), timeout=120)
    assert response.steps == 4  # --default-steps
    assert len(response.request_id) > 0  # generated
    [image] = response.images
    decoded = decode(image)
    assert decoded.format == "PNG" and decoded.size == (64, 64)  # first served resolution


def test_generate_stream_sends_queued_progress_images_then_done(stub) -> None:
    request = sdxl_pb2.GenerateRequest(prompt="a stream", num_images=2, steps=3, format=sdxl_pb2.WEBP)
    kinds = []
    images = []
    last_progress = 0
    done = None
    for event in stub.GenerateStream(request, timeout=120):
        kind = event.WhichOneof("event")
        kinds.append(kind)
        if kind == "progress":
            assert event.progress.total_steps == 6
            assert event.progress.completed_steps >= last_progress
            last_progress = event.progress.completed_steps
        elif kind == "image":
            images.append(event.image)
        elif kind == "done":
            done = event.done
    assert kinds[0] == "queued" and kinds[-1] == "done"
    assert kinds.count("queued") == 1 and kinds.count("done") == 1
    assert "progress" in kinds and kinds.index("progress") < kinds.index("image")
    assert last_progress == 6
    assert sorted(image.index for image in images) == [0, 1]
    assert all(decode(image).format == "WEBP" and decode(image).size == (64, 64) for image in images)
    assert done is not None and done.num_images == 2 and done.steps == 3


def test_a_prompt_longer_than_77_tokens_is_truncated_and_reported(stub) -> None:
    long_prompt = " ".join(["a very detailed painting of a lighthouse"] * 40)
    response = stub.Generate(sdxl_pb2.GenerateRequest(prompt=long_prompt, steps=1), timeout=120)
    assert response.prompt_truncated
    assert len(response.images) == 1


@pytest.mark.parametrize(
    ("fields", "bad_field"),
    [
        ({"prompt": ""}, "prompt"),
        ({"width": 96, "height": 96}, "width"),
        ({"width": 64}, "height"),
        ({"steps": 21}, "steps"),
        ({"guidance_scale": 1000.0}, "guidance_scale"),
        ({"num_images": 99}, "num_images"),
        ({"format": 42}, "format"),
        ({"quality": 101}, "quality"),
    ],
)
def test_invalid_requests_are_rejected_naming_the_field(stub, fields, bad_field) -> None:
    request = sdxl_pb2.GenerateRequest(**{"prompt": "a cat", **fields})
    for call in (stub.Generate, lambda r, timeout: list(stub.GenerateStream(r, timeout=timeout))):
        with pytest.raises(grpc.RpcError) as caught:
            call(request, timeout=30)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert bad_field in caught.value.details()
        assert bad_field in bad_request_fields(caught.value)


def test_every_violation_is_reported_at_once(stub) -> None:
    request = sdxl_pb2.GenerateRequest(prompt="", steps=999, num_images=99)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Generate(request, timeout=30)
    assert set(bad_request_fields(caught.value)) == {"prompt", "steps", "num_images"}


def test_reflection_lists_the_image_service(shared_server) -> None:
    with shared_server.channel() as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {"sdxl.v1.ImageService", "grpc.health.v1.Health"} <= services
        method_names = {
            m.name for m in database.FindFileContainingSymbol("sdxl.v1.ImageService").service[0].method
        }
        assert method_names == {"Generate", "GenerateStream", "GetServerInfo"}


def test_metrics_count_requests_and_work(shared_server, stub) -> None:
    before = metric_samples(shared_server.scrape_metrics())
    stub.Generate(sdxl_pb2.GenerateRequest(prompt="counted", num_images=2, steps=3), timeout=120)
    with pytest.raises(grpc.RpcError):
        stub.Generate(sdxl_pb2.GenerateRequest(prompt=""), timeout=30)
    after = metric_samples(shared_server.scrape_metrics())

    def moved(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert moved("sdxl_requests_total", method="Generate", code="OK") == 1
    assert moved("sdxl_requests_total", method="Generate", code="INVALID_ARGUMENT") == 1
    assert moved("sdxl_request_duration_seconds_count", method="Generate") == 2
    assert moved("sdxl_images_total") == 2
    assert moved("sdxl_steps_total") >= 6
    # How full the batches ran: busy slots' UNet row-steps within those the programs ran; the decodes.
    assert 6 <= moved("sdxl_unet_busy_row_steps_total") <= moved("sdxl_unet_row_steps_total")
    assert 1 <= moved("sdxl_decodes_total") <= 2 <= moved("sdxl_decode_rows_total")
    assert moved("sdxl_queue_wait_seconds_count") == 1
    assert moved("sdxl_step_duration_seconds_count") >= 3  # batched steps (2 images may share a step)
    assert sample(after, "sdxl_step_duration_seconds_bucket", le="+Inf") == sample(
        after, "sdxl_step_duration_seconds_count"
    )
    assert sample(after, "sdxl_ready") == 1
    assert sample(after, "sdxl_slots_total") >= 1
    for gauge in ("sdxl_queue_depth", "sdxl_slots_busy", "sdxl_load", "sdxl_device_busy_ratio"):
        assert (gauge, frozenset()) in after, gauge
    for gauge in ("sdxl_compile_seconds", "sdxl_startup_seconds"):
        assert sample(after, gauge) > 0, gauge
    # One engine over the devices: no per-engine series (they come with --engine-per-device).
    assert not [name for name, _ in after if name.startswith("sdxl_engine_")]


def test_logs_are_json_and_leave_prompts_out_by_default(shared_server, stub) -> None:
    request = sdxl_pb2.GenerateRequest(prompt="a private prompt 7f3a9", steps=1, request_id="log-test-1")
    stub.Generate(request, timeout=120)
    admitted = shared_server.wait_for_log_entry(lambda entry: entry.get("request_id") == "log-test-1")
    assert admitted["event"] == "admitted" and admitted["steps"] == 1
    assert "7f3a9" not in shared_server.output()
