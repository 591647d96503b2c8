"""The largest seed the API can carry (uint64: 2^64-1) is served end to end, through both gRPC RPCs.

The service, the engine, the client and the proto agree on the bound (request_rules.MAX_SEED); a seed
the service capped lower would be refused here as INVALID_ARGUMENT.
"""

from __future__ import annotations

import grpc
import pytest
from sdxl_client import Client, InvalidRequest
from sdxl_client._proto.sdxl.v1 import sdxl_pb2
from sdxl_test_support.grpc_details import bad_request_fields, decode, image_stub

LARGEST_SEED = 2**64 - 1


def test_a_generate_request_with_the_largest_seed_is_served_and_reports_it(shared_server) -> None:
    with shared_server.channel() as channel:
        request = sdxl_pb2.GenerateRequest(prompt="a red cube", seed=LARGEST_SEED, steps=1)
        response = image_stub(channel).Generate(request, timeout=120)
    assert response.seed == LARGEST_SEED
    [image] = response.images
    assert image.seed == LARGEST_SEED
    assert decode(image).size == (64, 64)


def test_the_stream_and_the_client_report_the_largest_seed_too(shared_server) -> None:
    with shared_server.channel() as channel:
        request = sdxl_pb2.GenerateRequest(prompt="a red cube", seed=LARGEST_SEED, steps=1)
        events = list(image_stub(channel).GenerateStream(request, timeout=120))
    [image] = [event.image for event in events if event.WhichOneof("event") == "image"]
    assert image.seed == LARGEST_SEED
    assert events[-1].done.seed == LARGEST_SEED
    with Client(shared_server.target, timeout=120) as client:
        result = client.generate("a red cube", seed=LARGEST_SEED, steps=1)
    assert result.seed == LARGEST_SEED and [i.seed for i in result.images] == [LARGEST_SEED]


def test_two_images_from_the_largest_seed_would_overflow_and_are_refused_naming_the_seed(
    shared_server,
) -> None:
    with shared_server.channel() as channel:
        request = sdxl_pb2.GenerateRequest(prompt="a red cube", seed=LARGEST_SEED, num_images=2, steps=1)
        with pytest.raises(grpc.RpcError) as refused:
            image_stub(channel).Generate(request, timeout=120)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert list(bad_request_fields(refused.value)) == ["seed"]
    with Client(shared_server.target, timeout=120) as client, pytest.raises(InvalidRequest):
        client.generate("a red cube", seed=LARGEST_SEED, num_images=2, steps=1)
