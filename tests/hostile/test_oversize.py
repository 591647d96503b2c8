"""Messages over a size limit: a clear RESOURCE_EXHAUSTED, raised by the client at once (no retries)."""

from __future__ import annotations

import grpc
import pytest
from hostile_wire import GENERATE, TOKEN, bearer, call
from sdxl_client import Client, MessageTooLarge, RetryPolicy
from sdxl_client._channel import ChannelSettings
from sdxl_client._errors import from_rpc_error
from sdxl_client._proto.sdxl.v1 import sdxl_pb2
from sdxl_server.service.grpc_server import MAX_REQUEST_BYTES
from sdxl_test_support.metrics_page import metric_samples


def test_a_request_over_the_server_limit_is_refused_by_size(hostile_server) -> None:
    body = sdxl_pb2.GenerateRequest(prompt="a" * (MAX_REQUEST_BYTES + 1)).SerializeToString()
    with hostile_server.channel() as channel:
        outcome = call(channel, GENERATE, body, bearer(TOKEN))
    assert outcome.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in outcome.details and str(MAX_REQUEST_BYTES) in outcome.details
    assert outcome.retry_delay is None  # not the overload answer: nothing says "later"


def test_the_largest_valid_request_fits_far_inside_the_limit() -> None:
    # Two prompts at the 16,384-character limit, each character 4 bytes of UTF-8.
    fox = "🦊" * 16384
    largest = sdxl_pb2.GenerateRequest(prompt=fox, negative_prompt=fox, request_id="r" * 128)
    assert len(largest.SerializeToString()) * 4 < MAX_REQUEST_BYTES


def test_the_client_does_not_retry_a_message_too_large(hostile_server) -> None:
    retries = []
    before = metric_samples(hostile_server.scrape_metrics())
    with (
        Client(
            hostile_server.target,
            token=TOKEN,
            retry=RetryPolicy(max_attempts=5, initial_backoff=0.01),
            on_retry=lambda error, attempt, wait: retries.append(error),
        ) as client,
        pytest.raises(MessageTooLarge) as raised,
    ):
        client.generate("a" * (5 << 20))
    assert retries == []  # one 5 MB attempt, not five
    assert not raised.value.retryable
    assert "larger than max" in raised.value.message
    # Refused by grpc before any handler ran: the request counters did not move.
    after = metric_samples(hostile_server.scrape_metrics())
    assert {k: v for k, v in after.items() if k[0] == "sdxl_requests_total"} == {
        k: v for k, v in before.items() if k[0] == "sdxl_requests_total"
    }


def test_the_clients_own_send_limit_is_a_clear_error_before_anything_is_sent(hostile_server) -> None:
    settings = ChannelSettings(target=hostile_server.target, max_message_bytes=1024)
    with grpc.insecure_channel(settings.target, options=settings.options()) as channel:
        stub = channel.unary_unary(GENERATE, request_serializer=sdxl_pb2.GenerateRequest.SerializeToString)
        with pytest.raises(grpc.RpcError) as raised:
            stub(sdxl_pb2.GenerateRequest(prompt="a" * 2048), metadata=bearer(TOKEN), timeout=30)
    error = from_rpc_error(raised.value)
    assert isinstance(error, MessageTooLarge) and not error.retryable
    assert "Sent message larger than max" in error.message and "1024" in error.message
