"""The gRPC door (sdxl_server.service.servicer.ImageService) on a real grpc.aio server on 127.0.0.1, in
this process, over the fake engine (sdxl_test_support.fake_engine): responses and stream order, statuses
as callers see them and as sdxl_requests_total counts them, and a caller's cancel reaching the engine."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import grpc.aio
from prometheus_client import CollectorRegistry
from sdxl_client._proto.sdxl.v1 import sdxl_pb2, sdxl_pb2_grpc
from sdxl_server.engine import api
from sdxl_server.metrics import ServiceMetrics
from sdxl_server.service.servicer import ImageService
from sdxl_server.service.serving_gate import Admission
from sdxl_server.service.status_mapping import INTERNAL_MESSAGE
from sdxl_test_support.fake_engine import IDLE, AdmittedRequests, FakeEngine, image_bytes
from sdxl_test_support.grpc_details import retry_delay_seconds


@dataclasses.dataclass
class Door:
    stub: sdxl_pb2_grpc.ImageServiceStub
    admission: Admission
    registry: CollectorRegistry

    def counted(self, method: str, code: str) -> float:
        value = self.registry.get_sample_value("sdxl_requests_total", {"method": method, "code": code})
        return value or 0.0


@contextlib.asynccontextmanager
async def _door(engine: FakeEngine, serving: bool = True) -> AsyncIterator[Door]:
    registry = CollectorRegistry()
    admission = Admission(engine, max_queue=16)
    if serving:
        admission.mark_serving()
    server = grpc.aio.server()
    sdxl_pb2_grpc.add_ImageServiceServicer_to_server(
        ImageService(engine, admission, ServiceMetrics(registry)), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield Door(sdxl_pb2_grpc.ImageServiceStub(channel), admission, registry)
    finally:
        await server.stop(grace=None)


def _served(engine: FakeEngine, body: Callable[[Door], Awaitable[object]], serving: bool = True) -> object:
    async def run() -> object:
        async with _door(engine, serving) as door:
            return await body(door)

    return asyncio.run(run())


async def _failure(call: Awaitable[object]) -> grpc.aio.AioRpcError:
    try:
        await call
    except grpc.aio.AioRpcError as e:
        return e
    raise AssertionError("the call succeeded")


def test_generate_returns_every_image_in_index_order_with_the_values_used() -> None:
    engine = FakeEngine()

    async def body(door: Door) -> tuple[sdxl_pb2.GenerateResponse, float]:
        request = sdxl_pb2.GenerateRequest(prompt="a lighthouse", seed=11, num_images=3, steps=2)
        response = await door.stub.Generate(request, timeout=30)
        return response, door.counted("Generate", "OK")

    response, counted = _served(engine, body)  # type: ignore[misc]
    request_id = engine.requests[0].request_id
    assert [image.index for image in response.images] == [0, 1, 2]  # the fake sends them backwards
    assert [image.data for image in response.images] == [image_bytes(request_id, i) for i in range(3)]
    assert [image.seed for image in response.images] == [11, 12, 13]
    assert (response.request_id, response.seed, response.steps) == (request_id, 11, 2)
    assert response.timings.queue_seconds == 0.25
    assert counted == 1


def test_the_stream_sends_queued_then_progress_then_images_then_done() -> None:
    engine = FakeEngine()

    async def body(door: Door) -> list[sdxl_pb2.GenerateEvent]:
        request = sdxl_pb2.GenerateRequest(prompt="a lighthouse", num_images=2, steps=3)
        return [event async for event in door.stub.GenerateStream(request, timeout=30)]

    events: list[sdxl_pb2.GenerateEvent] = _served(engine, body)  # type: ignore[assignment]
    kinds = [event.WhichOneof("event") for event in events]
    assert kinds == ["queued", "progress", "progress", "progress", "image", "image", "done"]
    assert [e.progress.completed_steps for e in events if e.HasField("progress")] == [2, 4, 6]
    assert events[0].queued.request_id == events[-1].done.request_id == engine.requests[0].request_id


def test_a_warming_server_answers_unavailable_with_a_retry_delay_and_counts_it() -> None:
    engine = FakeEngine()

    async def body(door: Door) -> tuple[grpc.aio.AioRpcError, float]:
        error = await _failure(door.stub.Generate(sdxl_pb2.GenerateRequest(prompt="x"), timeout=30))
        return error, door.counted("Generate", "UNAVAILABLE")

    error, counted = _served(engine, body, serving=False)  # type: ignore[misc]
    assert error.code() is grpc.StatusCode.UNAVAILABLE
    assert retry_delay_seconds(error) > 0  # type: ignore[arg-type]
    assert counted == 1 and engine.requests == []


def test_a_grpc_deadline_shorter_than_the_steps_is_refused_by_the_server_before_the_engine() -> None:
    engine = FakeEngine(stats_snapshot=dataclasses.replace(IDLE, step_seconds_ewma=1.0))

    async def body(door: Door) -> grpc.aio.AioRpcError:
        request = sdxl_pb2.GenerateRequest(prompt="x", steps=10)  # 10 s of steps, 5 s of deadline
        return await _failure(door.stub.Generate(request, timeout=5))

    error: grpc.aio.AioRpcError = _served(engine, body)  # type: ignore[assignment]
    assert error.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert "idle server" in (error.details() or "")  # the server's answer, not the client's own expiry
    assert engine.requests == []


def test_an_engine_fault_is_internal_with_a_fixed_message_and_counted() -> None:
    engine = FakeEngine()
    engine.fail_with = api.EngineFatalError("device lost: HBM parity error at 0x7f00")

    async def body(door: Door) -> tuple[grpc.aio.AioRpcError, float]:
        stream = door.stub.GenerateStream(sdxl_pb2.GenerateRequest(prompt="x"), timeout=30)
        error = await _failure(_drain(stream))
        return error, door.counted("GenerateStream", "INTERNAL")

    error, counted = _served(engine, body)  # type: ignore[misc]
    assert error.code() is grpc.StatusCode.INTERNAL
    assert error.details() == INTERNAL_MESSAGE
    assert counted == 1


async def _drain(stream: AsyncIterator[sdxl_pb2.GenerateEvent]) -> None:
    async for _ in stream:
        pass


def test_a_caller_that_cancels_a_stream_cancels_its_engine_request() -> None:
    engine = FakeEngine()
    engine.hold = True

    async def body(door: Door) -> list[str]:
        stream = door.stub.GenerateStream(sdxl_pb2.GenerateRequest(prompt="x"), timeout=30)
        seen = [(await stream.read()).WhichOneof("event"), (await stream.read()).WhichOneof("event")]
        stream.cancel()
        request = await asyncio.to_thread(engine.wait_for_request)
        await asyncio.to_thread(engine.wait_for_cancel, request.request_id)
        return seen

    assert _served(engine, body) == ["queued", "progress"]
    assert engine.cancelled == [engine.requests[0].request_id]


def test_a_caller_that_cancels_a_unary_call_cancels_its_engine_request() -> None:
    engine = FakeEngine()
    engine.hold = True

    async def body(door: Door) -> None:
        async with AdmittedRequests() as admitted:
            call = door.stub.Generate(sdxl_pb2.GenerateRequest(prompt="x"), timeout=30)
            request_id = await admitted.wait()
        call.cancel()
        await asyncio.to_thread(engine.wait_for_cancel, request_id)

    _served(engine, body)
    assert engine.cancelled == [engine.requests[0].request_id]


def test_server_info_carries_the_engines_limits() -> None:
    engine = FakeEngine()

    async def body(door: Door) -> sdxl_pb2.ServerInfo:
        return await door.stub.GetServerInfo(sdxl_pb2.GetServerInfoRequest(), timeout=30)

    info: sdxl_pb2.ServerInfo = _served(engine, body)  # type: ignore[assignment]
    assert info.model == "fake-sdxl"
    assert [(r.width, r.height) for r in info.resolutions] == [(64, 64), (128, 64)]
    assert (info.max_steps, info.default_steps, info.max_queue) == (20, 4, 16)


def test_guidance_zero_is_honoured_and_an_unset_guidance_takes_the_models_default() -> None:
    engine = FakeEngine()

    async def body(door: Door) -> list[sdxl_pb2.GenerateResponse]:
        return [
            await door.stub.Generate(sdxl_pb2.GenerateRequest(prompt="a lighthouse", **extra), timeout=30)
            for extra in ({"guidance_scale": 0.0}, {}, {"sampler": sdxl_pb2.EULER})
        ]

    responses = _served(engine, body)
    default = engine.info().limits.default_guidance_scale
    assert [r.guidance_scale for r in engine.requests] == [0.0, default, default]
    assert [r.guidance_scale for r in responses] == [0.0, default, default]  # type: ignore[attr-defined]
    assert all(r.sampler == sdxl_pb2.EULER for r in responses)  # type: ignore[attr-defined]


def test_server_info_reports_the_models_recipe() -> None:
    async def body(door: Door) -> sdxl_pb2.ServerInfo:
        return await door.stub.GetServerInfo(sdxl_pb2.GetServerInfoRequest(), timeout=30)

    info = _served(FakeEngine(), body)
    assert info.default_sampler == sdxl_pb2.EULER  # type: ignore[attr-defined]
    assert info.default_timestep_spacing == sdxl_pb2.LEADING  # type: ignore[attr-defined]


def test_an_unknown_sampler_is_invalid_argument_naming_it() -> None:
    async def body(door: Door) -> grpc.aio.AioRpcError:
        return await _failure(
            door.stub.Generate(sdxl_pb2.GenerateRequest(prompt="a cat", sampler=42), timeout=30)
        )

    error = _served(FakeEngine(), body)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert "sampler" in error.details()  # type: ignore[attr-defined]
