"""The ``sdxl.v1.ImageService`` RPCs on top of an engine.

Every generation goes the same way: serving gate -> validation (defaults applied) -> deadline check ->
``engine.submit`` (bounded queue) -> engine events bridged into the event loop -> response or stream.
Each RPC ends in exactly one status, which is counted in ``sdxl_requests_total{method,code}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import grpc
import grpc.aio
from sdxl_client._proto.sdxl.v1 import sdxl_pb2, sdxl_pb2_grpc

from sdxl_server.engine import api
from sdxl_server.logs import fields
from sdxl_server.metrics import ServiceMetrics
from sdxl_server.service import errors
from sdxl_server.service.admission import Admission
from sdxl_server.service.bridge import EngineCall
from sdxl_server.service.validation import FORMAT_TO_PROTO, ValidationError, to_generation_request

log = logging.getLogger(__name__)


class _Outcome:
    """What one generation produced, filled in as its events arrive."""

    def __init__(self, request: api.GenerationRequest) -> None:
        self.request = request
        self.prompt_truncated = False
        self.timings = sdxl_pb2.Timings()

    def done(self) -> sdxl_pb2.Done:
        r = self.request
        return sdxl_pb2.Done(
            request_id=r.request_id,
            timings=self.timings,
            prompt_truncated=self.prompt_truncated,
            seed=r.seed,
            steps=r.steps,
            guidance_scale=r.guidance_scale,
            num_images=r.num_images,
        )


def _image(event: api.ImageReady) -> sdxl_pb2.Image:
    return sdxl_pb2.Image(
        data=event.data,
        format=FORMAT_TO_PROTO[event.image_format],
        width=event.width,
        height=event.height,
        seed=event.seed,
        index=event.index,
    )


class ImageService(sdxl_pb2_grpc.ImageServiceServicer):
    def __init__(
        self, engine: api.Engine, admission: Admission, metrics: ServiceMetrics, log_prompts: bool = False
    ) -> None:
        self._engine = engine
        self._admission = admission
        self._metrics = metrics
        self._log_prompts = log_prompts
        self._limits: api.Limits | None = None

    def _request_limits(self) -> api.Limits:
        # Fixed by the configuration; engine.info() is not cheap (it reads package versions), so it is
        # read once instead of on every request, which matters when rejecting an overload quickly.
        if self._limits is None:
            self._limits = self._engine.info().limits
        return self._limits

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
            images: list[sdxl_pb2.Image] = []
            done = sdxl_pb2.Done()
            async for outcome, event in self._generate(request, context):
                if isinstance(event, api.ImageReady):
                    images.append(_image(event))
                elif isinstance(event, api.Finished):
                    done = outcome.done()
            return sdxl_pb2.GenerateResponse(
                images=sorted(images, key=lambda image: image.index),
                request_id=done.request_id,
                timings=done.timings,
                prompt_truncated=done.prompt_truncated,
                seed=done.seed,
                steps=done.steps,
                guidance_scale=done.guidance_scale,
            )
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
                    yield sdxl_pb2.GenerateEvent(image=_image(event))
                elif isinstance(event, api.Finished):
                    yield sdxl_pb2.GenerateEvent(done=outcome.done())

    async def GetServerInfo(
        self, request: sdxl_pb2.GetServerInfoRequest, context: grpc.aio.ServicerContext
    ) -> sdxl_pb2.ServerInfo:
        async with self._rpc("GetServerInfo", context):
            return server_info(self._engine.info())
        raise AssertionError("unreachable: _rpc re-raises every failure")

    async def _generate(
        self, message: sdxl_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[tuple[_Outcome, api.EngineEvent]]:
        """Admits the request and yields its engine events up to Finished; raises ServiceError on failure."""
        with self._admission.admitted():
            time_remaining = context.time_remaining()
            try:
                request = to_generation_request(message, self._request_limits(), time_remaining)
            except ValidationError as e:
                raise errors.from_validation(e) from None
            self._admission.check(request, time_remaining)
            call = EngineCall(self._engine, asyncio.get_running_loop())
            try:
                call.submit(request)
            except api.EngineError as e:
                raise errors.from_engine_error(e) from None
            self._log_admitted(request)
            context.add_done_callback(lambda _: call.cancel())
            outcome = _Outcome(request)
            try:
                async for event in call.events():
                    if isinstance(event, api.Failed):
                        if isinstance(event.error, api.EngineFatalError):
                            log.error("request %s failed in the engine: %r", request.request_id, event.error)
                        raise errors.from_engine_error(event.error)
                    if isinstance(event, api.Queued):
                        outcome.prompt_truncated = event.prompt_truncated
                    elif isinstance(event, api.Finished):
                        outcome.timings = sdxl_pb2.Timings(
                            queue_seconds=event.queue_seconds,
                            denoise_seconds=event.denoise_seconds,
                            total_seconds=event.total_seconds,
                        )
                        self._metrics.queue_wait.observe(event.queue_seconds)
                    yield outcome, event
            finally:
                call.cancel()  # no-op unless the RPC ended before the engine finished

    def _log_admitted(self, request: api.GenerationRequest) -> None:
        extra = {
            "event": "admitted",
            "request_id": request.request_id,
            "num_images": request.num_images,
            "steps": request.steps,
            "resolution": str(request.resolution),
            "seed": request.seed,
        }
        if self._log_prompts:
            extra.update(prompt=request.prompt, negative_prompt=request.negative_prompt)
        log.info("request admitted", extra=fields(**extra))

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
        if isinstance(error, errors.ServiceError):
            return error, error.code
        log.error("unexpected error in a request", exc_info=error)
        return errors.from_engine_error(error), grpc.StatusCode.INTERNAL


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
        max_images_per_request=limits.max_images_per_request,
        max_prompt_tokens=limits.max_prompt_tokens,
        slots=info.slots,
        devices=info.devices,
        device_kind=info.device_kind,
        policy=info.policy,
        dtype=info.dtype,
        max_queue=limits.max_queue,
        formats=list(FORMAT_TO_PROTO.values()),
        versions=info.versions,
    )
