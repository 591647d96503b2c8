"""Both doors count only first attempts as demand (``x-sdxl-attempt``, service/demand.py): gRPC metadata on
the gRPC door, a header on the HTTP door, each on a real server on 127.0.0.1 over the fake engine. A
refused first attempt still counts (the signal exists to see refused work); its retries do not; a bad
value is INVALID_ARGUMENT naming the header."""

from __future__ import annotations

import asyncio

import aiohttp
import grpc
import grpc.aio
import pytest
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry
from sdxl_client._proto.sdxl.v1 import sdxl_pb2, sdxl_pb2_grpc
from sdxl_server.engine import api
from sdxl_server.metrics import ServiceMetrics
from sdxl_server.service.demand import ATTEMPT_HEADER, DemandMeter
from sdxl_server.service.generation import Generations
from sdxl_server.service.http.images_api import ImagesApi
from sdxl_server.service.servicer import ImageService
from sdxl_server.service.serving_gate import Admission
from sdxl_test_support.fake_engine import FakeEngine

_PRICED = api.EngineStats(
    queue_depth=0,
    slots_busy=0,
    slots_total=4,
    load=0.0,
    steps_total=0,
    images_total=0,
    step_seconds_ewma=0.1,
    device_busy_ratio=0.0,
    compile_seconds=0.0,
    startup_seconds=0.0,
    ready=True,
    healthy=True,
)

# One default request (1 image of the fake engine's default 4 steps, 0.1 s a step) over a 10 s window
# and 4 slots, in pods.
_ONE_REQUEST = 1 * 4 * 0.1 / 10.0 / 4


def _full_engine_and_meter() -> tuple[FakeEngine, DemandMeter, Admission]:
    engine = FakeEngine()
    engine.refuse_with = api.QueueFullError("admission queue full", 1.0)  # every attempt is refused
    meter = DemandMeter(10.0, clock=lambda: 100.0)  # a still clock: nothing leaves the window
    admission = Admission(engine, max_queue=16, demand=meter)
    admission.mark_serving()
    return engine, meter, admission


def test_the_grpc_door_counts_first_attempts_only() -> None:
    engine, meter, admission = _full_engine_and_meter()

    async def calls() -> list[grpc.StatusCode]:
        server = grpc.aio.server()
        service = ImageService(engine, admission, ServiceMetrics(CollectorRegistry()))
        sdxl_pb2_grpc.add_ImageServiceServicer_to_server(service, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        codes = []
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = sdxl_pb2_grpc.ImageServiceStub(channel)
                for request_id, attempt in (("a", "1"), ("a", "2"), ("b", "3"), ("c", None), ("d", "x")):
                    metadata = () if attempt is None else ((ATTEMPT_HEADER, attempt),)
                    try:
                        await stub.Generate(
                            sdxl_pb2.GenerateRequest(prompt="x", request_id=request_id), metadata=metadata
                        )
                    except grpc.aio.AioRpcError as e:
                        codes.append(e.code())
                        if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                            assert ATTEMPT_HEADER in (e.details() or "")
        finally:
            await server.stop(grace=None)
        return codes

    codes = asyncio.run(calls())
    assert codes == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 4 + [grpc.StatusCode.INVALID_ARGUMENT]
    # "a" (attempt 1) and "c" (no header: a first attempt) count; "a"'s retry and "b" (attempt 3) do not.
    assert meter.value(_PRICED) == pytest.approx(2 * _ONE_REQUEST)


def test_the_http_door_counts_first_attempts_only() -> None:
    engine, meter, admission = _full_engine_and_meter()

    async def calls() -> list[tuple[int, str]]:
        door = ImagesApi(Generations(engine, admission, ServiceMetrics(CollectorRegistry())))
        server = TestServer(door.application(), host="127.0.0.1")
        await server.start_server()
        answers = []
        try:
            async with aiohttp.ClientSession() as session:
                for request_id, attempt in (("a", "1"), ("a", "2"), ("b", "3"), ("c", None), ("d", "0")):
                    headers = {"X-Request-Id": request_id}
                    if attempt is not None:
                        headers["X-Sdxl-Attempt"] = attempt  # HTTP header names are case-insensitive
                    url = str(server.make_url("/v1/images/generations"))
                    async with session.post(url, json={"prompt": "x"}, headers=headers) as response:
                        answers.append((response.status, (await response.json())["error"]["message"]))
        finally:
            await server.close()
        return answers

    answers = asyncio.run(calls())
    assert [status for status, _ in answers] == [429, 429, 429, 429, 400]
    assert ATTEMPT_HEADER in answers[-1][1]
    assert meter.value(_PRICED) == pytest.approx(2 * _ONE_REQUEST)


def test_a_served_request_prices_demand_at_its_slot_time() -> None:
    # The fake engine denoises a request's 4 steps in 0.5 s: 0.125 s an image-step, more than the device's
    # 0.1 s, so a pod that was never saturated prices its arrivals at its served requests' slot time.
    engine = FakeEngine()
    meter = DemandMeter(10.0, clock=lambda: 100.0)
    admission = Admission(engine, max_queue=16, demand=meter)
    admission.mark_serving()

    async def call() -> None:
        server = grpc.aio.server()
        service = ImageService(engine, admission, ServiceMetrics(CollectorRegistry()))
        sdxl_pb2_grpc.add_ImageServiceServicer_to_server(service, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                await sdxl_pb2_grpc.ImageServiceStub(channel).Generate(sdxl_pb2.GenerateRequest(prompt="x"))
        finally:
            await server.stop(grace=None)

    asyncio.run(call())
    assert meter.value(_PRICED) == pytest.approx(_ONE_REQUEST * 0.125 / 0.1)
