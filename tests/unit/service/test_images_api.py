"""The HTTP door (sdxl_server.service.http.images_api.ImagesApi) on a real aiohttp server on 127.0.0.1, in
this process, over the fake engine (sdxl_test_support.fake_engine): the OpenAI response, statuses mapped
from the shared path's, the deadline header's pre-check, and a caller that disconnects cancelling its
engine request."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry
from sdxl_server.engine import api
from sdxl_server.metrics import ServiceMetrics
from sdxl_server.service.generation import Generations
from sdxl_server.service.http.images_api import ImagesApi
from sdxl_server.service.serving_gate import Admission
from sdxl_server.service.status_mapping import INTERNAL_MESSAGE
from sdxl_test_support.fake_engine import IDLE, AdmittedRequests, FakeEngine, image_bytes

IMAGES = "/v1/images/generations"


@dataclasses.dataclass
class Door:
    session: aiohttp.ClientSession
    base: str
    admission: Admission
    registry: CollectorRegistry

    async def post(self, body: dict[str, Any], headers: dict[str, str] | None = None) -> tuple[int, Any, Any]:
        """(status, headers, JSON body)."""
        async with self.session.post(self.base + IMAGES, json=body, headers=headers) as response:
            return response.status, response.headers, await response.json()

    def counted(self, method: str, code: str) -> float:
        value = self.registry.get_sample_value("sdxl_requests_total", {"method": method, "code": code})
        return value or 0.0


@contextlib.asynccontextmanager
async def _door(engine: FakeEngine, serving: bool = True) -> AsyncIterator[Door]:
    registry = CollectorRegistry()
    admission = Admission(engine, max_queue=16)
    if serving:
        admission.mark_serving()
    api_ = ImagesApi(Generations(engine, admission, ServiceMetrics(registry)))
    # As the server runs it (service/http/http_server.py): a caller that disconnects cancels its handler.
    server = TestServer(api_.application(), host="127.0.0.1", handler_cancellation=True)
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            yield Door(session, str(server.make_url("")).rstrip("/"), admission, registry)
    finally:
        await server.close()


def _served(engine: FakeEngine, body: Callable[[Door], Awaitable[Any]], serving: bool = True) -> Any:
    async def run() -> Any:
        async with _door(engine, serving) as door:
            return await body(door)

    return asyncio.run(run())


def test_the_openai_response_carries_every_image_in_order_and_the_values_used() -> None:
    engine = FakeEngine()

    async def body(door: Door) -> tuple[int, Any, Any, float]:
        status, headers, payload = await door.post({"prompt": "a lighthouse", "n": 2, "seed": 5, "steps": 3})
        return status, headers, payload, door.counted("CreateImage", "OK")

    status, headers, payload, counted = _served(engine, body)
    assert status == 200, payload
    request_id = engine.requests[0].request_id
    assert [base64.b64decode(d["b64_json"]) for d in payload["data"]] == [
        image_bytes(request_id, 0),
        image_bytes(request_id, 1),
    ]
    assert [d["seed"] for d in payload["data"]] == [5, 6]
    assert (payload["size"], payload["seed"], payload["steps"], payload["model"]) == (
        "64x64",
        5,
        3,
        "fake-sdxl",
    )
    assert headers["X-Request-Id"] == payload["request_id"] == request_id
    assert counted == 1


def test_a_warming_server_is_503_with_retry_after_and_nothing_reaches_the_engine() -> None:
    engine = FakeEngine()

    async def body(door: Door) -> tuple[int, Any, Any, float]:
        status, headers, payload = await door.post({"prompt": "x"})
        return status, headers, payload, door.counted("CreateImage", "UNAVAILABLE")

    status, headers, payload, counted = _served(engine, body, serving=False)
    assert status == 503 and payload["error"]["code"] == "unavailable"
    assert int(headers["Retry-After"]) >= 1
    assert counted == 1 and engine.requests == []


def test_a_full_engine_queue_is_429_with_retry_after() -> None:
    engine = FakeEngine()
    engine.refuse_with = api.QueueFullError("admission queue full", 2.5)

    status, headers, payload = _served(engine, lambda door: door.post({"prompt": "x"}))
    assert status == 429 and payload["error"]["code"] == "resource_exhausted"
    assert (headers["Retry-After"], headers["retry-after-ms"]) == ("3", "2500")


def test_a_bad_field_is_400_naming_it_as_the_caller_wrote_it() -> None:
    status, _, payload = _served(FakeEngine(), lambda door: door.post({"prompt": "x", "n": 9}))
    assert status == 400
    assert payload["error"]["param"] == "n" and payload["error"]["code"] == "invalid_argument"


def test_a_timeout_header_shorter_than_the_steps_is_504_before_the_engine() -> None:
    engine = FakeEngine(stats_snapshot=dataclasses.replace(IDLE, step_seconds_ewma=1.0))
    headers = {"X-Request-Timeout": "5"}

    status, _, payload = _served(engine, lambda door: door.post({"prompt": "x", "steps": 10}, headers))
    assert status == 504 and "idle server" in payload["error"]["message"]
    assert engine.requests == []


def test_an_engine_fault_is_500_with_the_fixed_message() -> None:
    engine = FakeEngine()
    engine.fail_with = api.EngineFatalError("device lost: HBM parity error at 0x7f00")

    status, _, payload = _served(engine, lambda door: door.post({"prompt": "x"}))
    assert status == 500
    assert payload["error"]["message"] == INTERNAL_MESSAGE and payload["error"]["code"] == "internal"


def test_a_caller_that_disconnects_cancels_its_engine_request() -> None:
    engine = FakeEngine()
    engine.hold = True

    async def body(door: Door) -> None:
        async with AdmittedRequests() as admitted:
            call = asyncio.create_task(door.post({"prompt": "x"}))
            request_id = await admitted.wait()
        call.cancel()  # closes the connection mid-request
        with contextlib.suppress(asyncio.CancelledError):
            await call
        await asyncio.to_thread(engine.wait_for_cancel, request_id)

    _served(engine, body)
    assert engine.cancelled == [engine.requests[0].request_id]


def test_models_lists_the_served_model() -> None:
    async def body(door: Door) -> Any:
        async with door.session.get(door.base + "/v1/models") as response:
            return response.status, await response.json()

    status, payload = _served(FakeEngine(), body)
    assert status == 200 and [m["id"] for m in payload["data"]] == ["fake-sdxl"]


def test_guidance_zero_is_honoured_and_an_unset_guidance_takes_the_models_default() -> None:
    engine = FakeEngine()

    async def body(door: Door) -> list[int]:
        statuses = []
        for extra in ({"guidance_scale": 0}, {}, {"guidance_interval": {"end": 0.4}, "sampler": "euler"}):
            status, _, _ = await door.post({"prompt": "a lighthouse", "steps": 3, **extra})
            statuses.append(status)
        return statuses

    assert _served(engine, body) == [200, 200, 200]
    default = engine.info().limits.default_guidance_scale
    assert [r.guidance_scale for r in engine.requests] == [0.0, default, default]
    assert engine.requests[2].guidance_interval == pytest.approx((0.0, 0.4))  # float32 on the way
    assert engine.requests[2].sampler == "euler"


def test_new_fields_with_bad_values_are_400_naming_them() -> None:
    async def body(door: Door) -> list[tuple[int, str]]:
        found = []
        for extra in (
            {"sampler": "heun"},
            {"timestep_spacing": "karras"},
            {"guidance_interval": {"start": 0.8, "end": 0.2}},
            {"timesteps": [249, 999]},
        ):
            status, _, payload = await door.post({"prompt": "a lighthouse", **extra})
            found.append((status, payload["error"]["param"]))
        return found

    assert _served(FakeEngine(), body) == [
        (400, "sampler"),
        (400, "timestep_spacing"),
        (400, "guidance_interval"),
        (400, "timesteps"),
    ]


def test_models_reports_the_models_recipe() -> None:
    async def body(door: Door) -> Any:
        async with door.session.get(door.base + "/v1/models") as response:
            return await response.json()

    engine = FakeEngine()
    recipe = _served(engine, body)["data"][0]["recipe"]
    limits = engine.info().limits
    assert recipe == {
        "sampler": limits.default_sampler,
        "timestep_spacing": limits.default_timestep_spacing,
        "steps": limits.default_steps,
        "guidance_scale": limits.default_guidance_scale,
    }
