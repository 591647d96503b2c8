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
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable

from sdxl_client._proto.sdxl.v1 import sdxl_pb2

from sdxl_server.engine import api
from sdxl_server.logs import fields
from sdxl_server.metrics import ServiceMetrics
from sdxl_server.service import status_mapping as errors
from sdxl_server.service.bridge import EngineCall
from sdxl_server.service.demand import ATTEMPT_HEADER, parse_attempt
from sdxl_server.service.request_conversion import (
    SAMPLER_TO_PROTO,
    ValidationError,
    to_generation_request,
)
from sdxl_server.service.request_log import RejectionLog, log_done
from sdxl_server.service.serving_gate import Admission
from sdxl_server.service.time_budget import TimeBudget

log = logging.getLogger(__name__)

# Told a function that cancels the engine request; it calls it when the caller goes away early.
OnCallerGone = Callable[[Callable[[], None]], None]


class Outcome:
    """What one generation produced, filled in as its events arrive."""

    def __init__(self, request: api.GenerationRequest) -> None:
        self.request = request
        self.prompt_truncated = False
        self.unknown_words: tuple[str, ...] = ()
        self.timings = sdxl_pb2.Timings()

    def done(self) -> sdxl_pb2.Done:
        r = self.request
        return sdxl_pb2.Done(
            request_id=r.request_id,
            timings=self.timings,
            prompt_truncated=self.prompt_truncated,
            unknown_words=self.unknown_words,
            seed=r.seed,
            steps=r.steps,
            guidance_scale=r.guidance_scale,
            num_images=r.num_images,
            sampler=SAMPLER_TO_PROTO.get(r.sampler, sdxl_pb2.SAMPLER_UNSPECIFIED),
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
        self._rejections = RejectionLog()

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
        progress: bool = True,
        attempt_header: str | None = None,
    ) -> AsyncIterator[tuple[Outcome, api.EngineEvent]]:
        """Admits the request and yields its engine events up to Finished; raises ServiceError on failure.

        ``time_remaining``: seconds until the caller's deadline (None: no deadline); ``progress``: False
        for a door that shows none (no Progress events then, bridge.py); ``attempt_header``: the
        client's ``x-sdxl-attempt`` value as the door received it (None: absent), so that only first
        attempts count as demand (service/demand.py). Every request
        leaves a trace in the log (see ``request_log``): a completion line once admitted, the
        rate-limited rejection log when refused before.
        """
        started = time.monotonic()
        notes = _RequestLogNotes(started)
        code = "OK"
        try:
            inner = self._admit_and_run(
                message, time_remaining, on_caller_gone, notes, progress, attempt_header
            )
            async with contextlib.aclosing(inner) as events:
                async for outcome, event in events:
                    if isinstance(event, api.Finished):
                        notes.finished = event
                    elif isinstance(event, api.Queued):
                        notes.unknown_words = event.unknown_words
                    yield outcome, event
        except errors.ServiceError as e:
            code = e.code.name
            if notes.request is None:
                self._rejections.record(e)
            raise
        except (asyncio.CancelledError, GeneratorExit):
            deadline = notes.request.deadline if notes.request else None
            late = deadline is not None and time.monotonic() >= deadline
            code = "OK" if notes.finished else "DEADLINE_EXCEEDED" if late else "CANCELLED"
            raise
        except BaseException:
            code = "INTERNAL"
            raise
        finally:
            if notes.request is not None:
                ended = time.monotonic()
                budget = notes.budget(ended)
                if budget is not None:
                    self.metrics.observe_phases(budget.seconds)
                log_done(notes.request, code, ended - started, notes.finished, notes.unknown_words, budget)

    async def _admit_and_run(
        self,
        message: sdxl_pb2.GenerateRequest,
        time_remaining: float | None,
        on_caller_gone: OnCallerGone | None,
        notes: _RequestLogNotes,
        progress: bool,
        attempt_header: str | None,
    ) -> AsyncGenerator[tuple[Outcome, api.EngineEvent], None]:
        with self._admission.admitted():
            try:
                request = to_generation_request(message, self.limits(), time_remaining)
            except ValidationError as e:
                raise errors.from_validation(e) from None
            try:
                attempt = parse_attempt(attempt_header)
            except ValueError as e:
                raise errors.invalid_argument([(ATTEMPT_HEADER, str(e))]) from None
            self._admission.check(request, time_remaining, attempt)
            call = EngineCall(self.engine, asyncio.get_running_loop(), progress)
            try:
                # Tokenizing (bounded, but still milliseconds) runs in a worker thread, never on the event
                # loop that answers health checks and every other caller.
                await _submit_in_thread(call, request)
            except api.EngineError as e:
                raise errors.from_engine_error(e) from None
            notes.request = request
            notes.submitted = time.monotonic()
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
                        outcome.unknown_words = event.unknown_words
                    elif isinstance(event, api.Finished):
                        # The response phase ends here for the Timings sent (the log and the metric,
                        # written when the request ends, count it to the end).
                        notes.finished = event
                        budget = notes.budget(time.monotonic())
                        if budget is not None:
                            outcome.timings = budget.timings()
                        self.metrics.queue_wait.observe(event.queue_seconds)
                        self._admission.served(request, event.denoise_seconds)
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


class _RequestLogNotes:
    """What ``run`` learns of a request for its log line: admitted as ``request``, and how it finished."""

    def __init__(self, arrived: float) -> None:
        self.arrived = arrived
        self.submitted: float | None = None  # when engine.submit returned
        self.request: api.GenerationRequest | None = None
        self.finished: api.Finished | None = None
        self.unknown_words: tuple[str, ...] = ()

    def budget(self, ended: float) -> TimeBudget | None:
        """The time budget of a request that finished, up to `ended`; None for one that did not."""
        if self.finished is None or self.submitted is None:
            return None
        return TimeBudget.of(self.arrived, self.submitted, ended, self.finished)


async def _submit_in_thread(call: EngineCall, request: api.GenerationRequest) -> None:
    """``call.submit`` in a worker thread. A caller that goes away meanwhile cancels this task, but not the
    thread: the engine may still admit the request after that, and nobody would ever cancel it (it would
    run for no one). So the submission is shielded, and a request admitted after its caller left is
    cancelled as soon as the submission returns."""
    submitting = asyncio.ensure_future(asyncio.to_thread(call.submit, request))
    try:
        await asyncio.shield(submitting)
    except asyncio.CancelledError:

        def cancel_once_admitted(done: asyncio.Future[None]) -> None:
            if not done.cancelled() and done.exception() is None:  # refused requests hold nothing
                call.cancel()

        submitting.add_done_callback(cancel_once_admitted)
        raise


def as_service_error(error: BaseException) -> errors.ServiceError:
    """The error to report for an exception a request ended with; anything unexpected is INTERNAL."""
    if isinstance(error, errors.ServiceError):
        return error
    log.error("unexpected error in a request", exc_info=error)
    return errors.from_engine_error(error)
