"""The ``sdxl.v1.ImageService`` RPCs on top of an engine.

Every generation takes the path shared with the HTTP front door (``generation.Generations``: serving
gate, validation, deadline and queue checks, engine events); this module turns its events into a response
or a stream. Each RPC ends in exactly one status, which is counted in ``sdxl_requests_total{method,code}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

import grpc
import grpc.aio
from sdxl_client._proto.sdxl.v1 import sdxl_pb2, sdxl_pb2_grpc

from sdxl_server.engine import api
from sdxl_server.metrics import ServiceMetrics
from sdxl_server.service import status_mapping as errors
from sdxl_server.service.demand import ATTEMPT_HEADER
from sdxl_server.service.generation import Generations, Outcome, as_service_error
from sdxl_server.service.request_conversion import FORMAT_TO_PROTO, SAMPLER_TO_PROTO, SPACING_TO_PROTO
from sdxl_server.service.serving_gate import Admission
from sdxl_server.version import server_version


def _fill_image(image: sdxl_pb2.Image, event: api.ImageReady) -> None:
    """Writes the image into the response's own message: the encoded bytes are copied into protobuf once
    (building an Image and then passing it to its parent would copy them a second time)."""
    image.data = event.data
    image.format = FORMAT_TO_PROTO[event.image_format]
    image.width = event.width
    image.height = event.height
    image.seed = event.seed
    image.index = event.index


class ImageService(sdxl_pb2_grpc.ImageServiceServicer):
    def __init__(
        self, engine: api.Engine, admission: Admission, metrics: ServiceMetrics, log_prompts: bool = False
    ) -> None:
        self._engine = engine
        self._metrics = metrics
        self._generations = Generations(engine, admission, metrics, log_prompts)

    @contextlib.asynccontextmanager
    async def _rpc(self, method: str, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        """Ends the RPC's body with exactly one status, counted in sdxl_requests_total{method,code}."""
        started = time.monotonic()
        try:
            yield
        except BaseException as e:
            error, code = self._classify(e, context)
            # Counted before the status goes out (abort sends it at once): a caller that has seen the
            # error and then reads /metrics finds it counted.
            self._metrics.observe_request(method, code.name, time.monotonic() - started)
            if error is not None:
                await errors.abort(context, error)
            raise
        else:
            self._metrics.observe_request(method, grpc.StatusCode.OK.name, time.monotonic() - started)

    async def Generate(
        self, request: sdxl_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> sdxl_pb2.GenerateResponse:
        async with self._rpc("Generate", context):
            ready: list[api.ImageReady] = []
            done = sdxl_pb2.Done()
            async for outcome, event in self._generate(request, context, progress=False):
                if isinstance(event, api.ImageReady):
                    ready.append(event)
                elif isinstance(event, api.Finished):
                    done = outcome.done()
            response = sdxl_pb2.GenerateResponse(
                request_id=done.request_id,
                timings=done.timings,
                prompt_truncated=done.prompt_truncated,
                unknown_words=done.unknown_words,
                seed=done.seed,
                steps=done.steps,
                guidance_scale=done.guidance_scale,
                sampler=done.sampler,
            )
            for event in sorted(ready, key=lambda image: image.index):
                _fill_image(response.images.add(), event)
            return response
        raise AssertionError("unreachable: _rpc re-raises every failure")

    async def GenerateStream(
        self, request: sdxl_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[sdxl_pb2.GenerateEvent]:
        async with self._rpc("GenerateStream", context):
            async for outcome, event in self._generate(request, context):
                if isinstance(event, api.Queued):
                    queued = sdxl_pb2.Queued(position=event.position, request_id=outcome.request.request_id)
                    yield sdxl_pb2.GenerateEvent(queued=queued)
                elif isinstance(event, api.Progress):
                    progress = sdxl_pb2.Progress(
                        completed_steps=event.completed_steps, total_steps=event.total_steps
                    )
                    yield sdxl_pb2.GenerateEvent(progress=progress)
                elif isinstance(event, api.ImageReady):
                    message = sdxl_pb2.GenerateEvent()
                    _fill_image(message.image, event)
                    yield message
                elif isinstance(event, api.Finished):
                    yield sdxl_pb2.GenerateEvent(done=outcome.done())

    async def GetServerInfo(
        self, request: sdxl_pb2.GetServerInfoRequest, context: grpc.aio.ServicerContext
    ) -> sdxl_pb2.ServerInfo:
        async with self._rpc("GetServerInfo", context):
            return server_info(self._engine.info())
        raise AssertionError("unreachable: _rpc re-raises every failure")

    def _generate(
        self, message: sdxl_pb2.GenerateRequest, context: grpc.aio.ServicerContext, progress: bool = True
    ) -> AsyncIterator[tuple[Outcome, api.EngineEvent]]:
        """The shared generation path, with the RPC's deadline and its end wired to cancellation;
        `progress` False for the unary Generate, which reports none."""

        def on_caller_gone(cancel: Callable[[], None]) -> None:
            context.add_done_callback(lambda _: cancel())

        attempt = dict(context.invocation_metadata() or ()).get(ATTEMPT_HEADER)
        return self._generations.run(message, context.time_remaining(), on_caller_gone, progress, attempt)

    def _classify(
        self, error: BaseException, context: grpc.aio.ServicerContext
    ) -> tuple[errors.ServiceError | None, grpc.StatusCode]:
        """The status an exception ends the RPC with, and the error to report (None: the RPC is over)."""
        if isinstance(error, asyncio.CancelledError | GeneratorExit):
            # The client cancelled or went away, or its deadline passed: grpc already ended the RPC.
            remaining = context.time_remaining()
            expired = remaining is not None and remaining <= 0
            return None, grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
        if isinstance(error, grpc.aio.AbortError):  # already aborted with a status
            return None, context.code() or grpc.StatusCode.UNKNOWN
        service_error = as_service_error(error)
        return service_error, service_error.code


def server_info(info: api.EngineInfo) -> sdxl_pb2.ServerInfo:
    limits = info.limits
    return sdxl_pb2.ServerInfo(
        model=info.model,
        resolutions=[sdxl_pb2.Resolution(width=r.width, height=r.height) for r in limits.resolutions],
        min_steps=limits.min_steps,
        max_steps=limits.max_steps,
        default_steps=limits.default_steps,
        min_guidance_scale=limits.min_guidance_scale,
        max_guidance_scale=limits.max_guidance_scale,
        default_guidance_scale=limits.default_guidance_scale,
        default_sampler=SAMPLER_TO_PROTO.get(limits.default_sampler, sdxl_pb2.SAMPLER_UNSPECIFIED),
        default_timestep_spacing=SPACING_TO_PROTO.get(
            limits.default_timestep_spacing, sdxl_pb2.TIMESTEP_SPACING_UNSPECIFIED
        ),
        max_images_per_request=limits.max_images_per_request,
        max_prompt_tokens=limits.max_prompt_tokens,
        slots=info.slots,
        devices=info.devices,
        engines=info.engines,
        device_kind=info.device_kind,
        policy=info.policy,
        dtype=info.dtype,
        max_queue=limits.max_queue,
        formats=list(FORMAT_TO_PROTO.values()),
        versions={"sdxl-server": server_version(), **info.versions},
        adapters=[
            sdxl_pb2.Adapter(name=a.name, usable=a.usable, reason=a.reason, rank=a.rank, resident=a.resident)
            for a in info.adapters
        ],
        max_loras_per_request=limits.max_loras_per_request,
        min_lora_scale=limits.min_lora_scale,
        max_lora_scale=limits.max_lora_scale,
    )
