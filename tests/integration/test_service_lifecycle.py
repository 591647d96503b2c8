"""Start-up and shutdown of a real server: NOT_SERVING until warm-up ends, and a graceful drain on SIGTERM."""

from __future__ import annotations

import signal

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sdxl_client._proto.sdxl.v1 import sdxl_pb2
from sdxl_test_support.grpc_details import decode, image_stub
from sdxl_test_support.held_warmup import HELD_SERVER_COMMAND

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
IMAGE_SERVICE_HEALTH = health_pb2.HealthCheckRequest(service="sdxl.v1.ImageService")


def test_not_serving_and_unavailable_until_warm_up_ends(server_factory, tmp_path) -> None:
    # The test-only entry point held_warmup makes warm-up wait for the file. Without it a fast warm-up
    # (compiled programs come from the shared cache) could end before the first health check, and the
    # test would race the server instead of observing the NOT_SERVING window for sure.
    go = tmp_path / "start-warm-up"
    server = server_factory(
        "--hold-warmup-until-file", str(go), wait_ready=False, command=HELD_SERVER_COMMAND
    )
    statuses = server.health_statuses()
    assert next(statuses) == NOT_SERVING
    with server.channel() as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        assert check(IMAGE_SERVICE_HEALTH, timeout=30).status == NOT_SERVING
        with pytest.raises(grpc.RpcError) as caught:
            image_stub(channel).Generate(sdxl_pb2.GenerateRequest(prompt="too early"), timeout=30)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "warming up" in caught.value.details()

        go.touch()
        assert next(status for status in statuses if status != NOT_SERVING) == SERVING
        assert check(IMAGE_SERVICE_HEALTH, timeout=30).status == SERVING
        response = image_stub(channel).Generate(sdxl_pb2.GenerateRequest(prompt="now", steps=1), timeout=120)
        assert len(response.images) == 1


def test_sigterm_finishes_accepted_requests_rejects_new_ones_and_exits_zero(server_factory) -> None:
    drain_seconds = 300
    server = server_factory(
        "--slots-per-device", "1", "--max-queue", "16", "--drain-seconds", str(drain_seconds)
    )
    with server.channel() as channel:
        stub = image_stub(channel)
        accepted = []
        for i in range(3):
            request = sdxl_pb2.GenerateRequest(
                prompt=f"accepted {i}", num_images=2, steps=6, request_id=f"a{i}"
            )
            stream = stub.GenerateStream(request, timeout=drain_seconds)
            assert next(stream).WhichOneof("event") == "queued"  # admitted before the signal
            accepted.append(stream)
        health = server.health_statuses()
        assert next(health) == SERVING

        server.process.send_signal(signal.SIGTERM)
        assert next(health) == NOT_SERVING  # the drain has begun: health flips before anything stops
        with pytest.raises(grpc.RpcError) as caught:
            stub.Generate(sdxl_pb2.GenerateRequest(prompt="too late"), timeout=30)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE

        for i, stream in enumerate(accepted):
            events = list(stream)
            assert events[-1].WhichOneof("event") == "done" and events[-1].done.request_id == f"a{i}"
            images = [event.image for event in events if event.WhichOneof("event") == "image"]
            assert sorted(image.index for image in images) == [0, 1]
            assert all(decode(image).size == (64, 64) for image in images)

    assert server.terminate(timeout=drain_seconds) == 0
    events = [entry.get("event") for entry in server.log_entries()]
    # The engine stops only after the gRPC server, so no accepted request lost its producer.
    assert events.index("draining") < events.index("grpc_stopped") < events.index("stopped")
