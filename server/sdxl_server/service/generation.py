"""The one generation path every front door takes: the gRPC ImageService and the OpenAI-style HTTP API.

serving gate -> validation (defaults applied) -> deadline and queue checks -> ``engine.submit`` (bounded
queue) -> engine events bridged into the event loop. A front door turns its own request format into a
``GenerateRequest`` message, iterates ``Generations.run`` and turns the events into its own responses;
failures leave ``run`` as ``ServiceError`` (a gRPC status plus details), which each door maps to what its
callers see. Each door ends every request with exactly one status, counted in
``sdxl_requests_total{method,code}`` with the gRPC code names, so that both doors share one set of metrics.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

from sdxl_client._proto.sdxl.v1 import sdxl_pb2

from sdxl_server.engine import api
from sdxl_server.logs import fields
from sdxl_server.metrics import ServiceMetrics
from sdxl_server.service import errors
from sdxl_server.service.admission import Admission
from sdxl_server.service.bridge import EngineCall
from sdxl_server.service.validation import ValidationError, to_generation_request

log = logging.getLogger(__name__)

# Told a function that cancels the engine request; it calls it when the caller goes away early.
OnCallerGone = Callable[[Callable[[], None]], None]


class Outcome:
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


class Generations:
    """Used from the event loop's thread only (as Admission is)."""

    def __init__(
        self, engine: api.Engine, admission: Admission, metrics: ServiceMetrics, log_prompts: bool = False
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self._admission = admission
        self._log_prompts = log_prompts
        self._limits: api.Limits | None = None
        self._model_name: str | None = None

    def limits(self) -> api.Limits:
        # Fixed by the configuration; engine.info() is not cheap (it reads package versions), so it is
        # read once instead of on every request, which matters when rejecting an overload quickly.
        if self._limits is None:
            self._limits = self.engine.info().limits
        return self._limits

    def model_name(self) -> str:
        if self._model_name is None:  # fixed by the configuration, as the limits are
            self._model_name = self.engine.info().model
        return self._model_name

    async def run(
        self,
        message: sdxl_pb2.GenerateRequest,
        time_remaining: float | None,
        on_caller_gone: OnCallerGone | None = None,
    ) -> AsyncIterator[tuple[Outcome, api.EngineEvent]]:
        """Admits the request and yields its engine events up to Finished; raises ServiceError on failure.

        ``time_remaining``: seconds until the caller's deadline (None: no deadline).
        """
        with self._admission.admitted():
            try:
                request = to_generation_request(message, self.limits(), time_remaining)
            except ValidationError as e:
                raise errors.from_validation(e) from None
            self._admission.check(request, time_remaining)
            call = EngineCall(self.engine, asyncio.get_running_loop())
            try:
                call.submit(request)
            except api.EngineError as e:
                raise errors.from_engine_error(e) from None
            self._log_admitted(request)
            if on_caller_gone is not None:
                on_caller_gone(call.cancel)
            outcome = Outcome(request)
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
                        self.metrics.queue_wait.observe(event.queue_seconds)
                    yield outcome, event
            finally:
                call.cancel()  # no-op unless the request ended before the engine finished

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


def as_service_error(error: BaseException) -> errors.ServiceError:
    """The error to report for an exception a request ended with; anything unexpected is INTERNAL."""
    if isinstance(error, errors.ServiceError):
        return error
    log.error("unexpected error in a request", exc_info=error)
    return errors.from_engine_error(error)
