"""Every attempt carries its number (``x-sdxl-attempt``: 1, 2, ...), so that the server counts only first
attempts as arriving work (sdxl_demand). A real gRPC server on a free port answers UNAVAILABLE twice, then
the call; the sync and the asyncio clients, unary and streaming paths."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from sdxl_client import Client, RetryPolicy
from sdxl_client._proto.sdxl.v1 import sdxl_pb2, sdxl_pb2_grpc
from sdxl_client._retry import ATTEMPT_METADATA_KEY
from sdxl_client.aio import AsyncClient

_FAST_RETRIES = RetryPolicy(max_attempts=5, initial_backoff=0.001, max_backoff=0.001)


class _FailsTwice(sdxl_pb2_grpc.ImageServiceServicer):
    def __init__(self) -> None:
        self.attempts: list[str | None] = []

    def _record(self, context: grpc.ServicerContext) -> None:
        self.attempts.append(dict(context.invocation_metadata()).get(ATTEMPT_METADATA_KEY))
        if len(self.attempts) % 3:  # attempts 1 and 2 of each call of three
            context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")

    def GetServerInfo(self, request, context):
        self._record(context)
        return sdxl_pb2.ServerInfo(model="tiny")

    def GenerateStream(self, request, context):
        self._record(context)
        yield from ()


@pytest.fixture
def served() -> Iterator[tuple[_FailsTwice, str]]:
    servicer = _FailsTwice()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    sdxl_pb2_grpc.add_ImageServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        server.stop(None)


def test_the_sync_client_numbers_every_attempt(served: tuple[_FailsTwice, str]) -> None:
    servicer, target = served
    with Client(target, retry=_FAST_RETRIES) as client:
        assert client.server_info(timeout=30).model == "tiny"
        assert list(client.generate_stream("a lighthouse", timeout=30)) == []
    assert servicer.attempts == ["1", "2", "3", "1", "2", "3"]


def test_the_asyncio_client_numbers_every_attempt(served: tuple[_FailsTwice, str]) -> None:
    servicer, target = served

    async def calls() -> None:
        async with AsyncClient(target, retry=_FAST_RETRIES) as client:
            assert (await client.server_info(timeout=30)).model == "tiny"
            assert [event async for event in client.generate_stream("a lighthouse", timeout=30)] == []

    asyncio.run(calls())
    assert servicer.attempts == ["1", "2", "3", "1", "2", "3"]
