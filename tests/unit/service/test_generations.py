"""The one generation path of both doors (sdxl_server.service.generation.Generations), in process, over the
fake engine (sdxl_test_support.fake_engine): gate order, deadline pre-checks, engine errors -> statuses,
the order of events, and cancellation reaching the engine."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import AsyncIterator, Callable

import grpc
import pytest
from google.rpc import error_details_pb2
from prometheus_client import CollectorRegistry
from sdxl_client._proto.sdxl.v1 import sdxl_pb2
from sdxl_server.engine import api
from sdxl_server.metrics import ServiceMetrics
from sdxl_server.service.generation import Generations, Outcome
from sdxl_server.service.serving_gate import Admission
from sdxl_server.service.status_mapping import INTERNAL_MESSAGE, ServiceError
from sdxl_test_support.fake_engine import IDLE, FakeEngine

MAX_QUEUE = 16
FULL = dataclasses.replace(IDLE, queue_depth=MAX_QUEUE)  # the engine's snapshot of a full queue


def _generations(engine: FakeEngine, serving: bool = True) -> tuple[Generations, Admission]:
    """Built inside the event loop that uses them (the gate's idle event belongs to it)."""
    admission = Admission(engine, MAX_QUEUE)
    if serving:
        admission.mark_serving()
    return Generations(engine, admission, ServiceMetrics(CollectorRegistry())), admission


def _request(**fields: object) -> sdxl_pb2.GenerateRequest:
    return sdxl_pb2.GenerateRequest(**{"prompt": "a lighthouse", "seed": 7, **fields})  # type: ignore[arg-type]


async def _events(
    generations: Generations,
    message: sdxl_pb2.GenerateRequest,
    time_remaining: float | None = None,
    on_caller_gone: Callable[[Callable[[], None]], None] | None = None,
) -> list[tuple[Outcome, api.EngineEvent]]:
    return [pair async for pair in generations.run(message, time_remaining, on_caller_gone)]


def _refused(
    engine: FakeEngine,
    message: sdxl_pb2.GenerateRequest,
    time_remaining: float | None = None,
    serving: bool = True,
) -> ServiceError:
    """The ServiceError a request ends with, through a gate over ``engine`` (serving, or warming up)."""

    async def run() -> ServiceError:
        generations, _ = _generations(engine, serving)
        with pytest.raises(ServiceError) as caught:
            await _events(generations, message, time_remaining)
        return caught.value

    return asyncio.run(run())


def _detail(error: ServiceError, kind: type) -> object:
    found = [detail for detail in error.details if isinstance(detail, kind)]
    assert found, f"no {kind.__name__} in {error.details}"
    return found[0]


def test_a_request_yields_queued_progress_images_and_finished_in_the_engines_order() -> None:
    engine = FakeEngine()

    async def run() -> list[tuple[Outcome, api.EngineEvent]]:
        generations, _ = _generations(engine)
        return await _events(generations, _request(steps=3, num_images=2))

    pairs = asyncio.run(run())
    kinds = [type(event).__name__ for _, event in pairs]
    assert kinds == ["Queued", "Progress", "Progress", "Progress", "ImageReady", "ImageReady", "Finished"]
    progress = [event.completed_steps for _, event in pairs if isinstance(event, api.Progress)]
    assert progress == [2, 4, 6]
    done = pairs[-1][0].done()
    assert (done.seed, done.steps, done.num_images) == (7, 3, 2)
    assert done.timings.total_seconds == 0.75  # the engine's Finished, as reported
    assert done.request_id == engine.requests[0].request_id


def test_while_warming_up_a_request_is_unavailable_before_it_is_validated() -> None:
    engine = FakeEngine()
    error = _refused(engine, _request(steps=999), serving=False)  # invalid too: the gate speaks first
    assert error.code is grpc.StatusCode.UNAVAILABLE
    assert "warming up" in error.message
    assert _detail(error, error_details_pb2.RetryInfo)
    assert engine.requests == []


def test_a_draining_server_refuses_new_requests_and_lets_the_admitted_one_finish() -> None:
    engine = FakeEngine()
    engine.hold = True

    async def run() -> tuple[ServiceError, list[str], bool]:
        generations, admission = _generations(engine)
        first = asyncio.create_task(_events(generations, _request()))
        await asyncio.to_thread(engine.wait_for_request)
        admission.begin_drain()
        with pytest.raises(ServiceError) as refused:
            await _events(generations, _request())
        assert admission.in_flight == 1  # the admitted one, still running
        engine.release()
        finished = [type(event).__name__ for _, event in await first]
        return refused.value, finished, await admission.wait_idle(30)

    refused, finished, idle = asyncio.run(run())
    assert refused.code is grpc.StatusCode.UNAVAILABLE and "shutting down" in refused.message
    assert finished[-1] == "Finished" and idle
    assert len(engine.requests) == 1


def test_a_bad_field_is_named_before_the_queue_is_looked_at() -> None:
    engine = FakeEngine(stats_snapshot=FULL)
    error = _refused(engine, _request(steps=999))
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    violations = _detail(error, error_details_pb2.BadRequest).field_violations  # type: ignore[attr-defined]
    assert [v.field for v in violations] == ["steps"]
    assert engine.requests == []


def test_a_full_queue_is_resource_exhausted_with_a_retry_delay_and_nothing_is_submitted() -> None:
    engine = FakeEngine(stats_snapshot=dataclasses.replace(FULL, retry_after_seconds=2.5))
    error = _refused(engine, _request())
    assert error.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _detail(error, error_details_pb2.RetryInfo).retry_delay.ToTimedelta().total_seconds() == 2.5  # type: ignore[attr-defined]
    assert engine.requests == []


def test_a_deadline_too_short_for_the_requests_own_steps_is_final_even_with_a_full_queue() -> None:
    # 4 steps at 1 s each cannot fit in 2 s on any server: retrying (the full queue's answer) cannot help.
    engine = FakeEngine(stats_snapshot=dataclasses.replace(FULL, step_seconds_ewma=1.0))
    error = _refused(engine, _request(steps=4), time_remaining=2.0)
    assert error.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert "idle server" in error.message
    assert engine.requests == []


def test_the_idle_server_check_counts_rows_so_twice_the_slots_of_unguided_images_take_one_round() -> None:
    """2 slots are 4 UNet rows: 4 unguided images of 4 steps at 1 s take 4 s and fit a 5 s deadline;
    guided they take two rounds, 8 s, and are refused."""
    engine = FakeEngine(stats_snapshot=dataclasses.replace(IDLE, slots_total=2, step_seconds_ewma=1.0))
    guided = _refused(engine, _request(steps=4, num_images=4, guidance_scale=5.0), time_remaining=5.0)
    assert (
        guided.code is grpc.StatusCode.DEADLINE_EXCEEDED and "8.00s even on an idle server" in guided.message
    )

    async def run() -> None:
        generations, _ = _generations(engine)
        await _events(generations, _request(steps=4, num_images=4, guidance_scale=0.0), time_remaining=5.0)

    asyncio.run(run())
    assert [r.guidance_scale for r in engine.requests] == [0.0]


def test_a_deadline_already_passed_or_beyond_the_engines_estimate_is_refused_before_submitting() -> None:
    engine = FakeEngine()
    assert _refused(engine, _request(), time_remaining=0.0).code is grpc.StatusCode.DEADLINE_EXCEEDED
    engine.estimate = 10.0  # queue ahead + own steps
    error = _refused(engine, _request(), time_remaining=5.0)
    assert error.code is grpc.StatusCode.DEADLINE_EXCEEDED and "10.00s" in error.message
    assert engine.requests == []


def test_a_deadline_that_fits_reaches_the_engine_with_the_request() -> None:
    engine = FakeEngine()
    engine.estimate = 1.0

    async def run() -> None:
        generations, _ = _generations(engine)
        await _events(generations, _request(), time_remaining=60.0)

    started = time.monotonic()
    asyncio.run(run())
    deadline = engine.requests[0].deadline
    assert deadline is not None and 0 < deadline - started <= 60.0 + 1.0


@pytest.mark.parametrize(
    ("refusal", "code"),
    [
        (api.InvalidRequestError("prompt", "is longer than 300 tokens"), grpc.StatusCode.INVALID_ARGUMENT),
        (api.QueueFullError("admission queue full", 1.5), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (api.DeadlineUnreachableError("too late"), grpc.StatusCode.DEADLINE_EXCEEDED),
        (api.NotReadyError("stopped"), grpc.StatusCode.UNAVAILABLE),
    ],
    ids=["invalid", "queue-full", "deadline", "not-ready"],
)
def test_an_engine_refusal_at_submit_maps_to_its_status(
    refusal: api.EngineError, code: grpc.StatusCode
) -> None:
    engine = FakeEngine()
    engine.refuse_with = refusal
    error = _refused(engine, _request())
    assert error.code is code
    if isinstance(refusal, api.InvalidRequestError):
        violations = _detail(error, error_details_pb2.BadRequest).field_violations  # type: ignore[attr-defined]
        assert [(v.field, v.description) for v in violations] == [("prompt", "is longer than 300 tokens")]
    if isinstance(refusal, api.QueueFullError):
        delay = _detail(error, error_details_pb2.RetryInfo).retry_delay  # type: ignore[attr-defined]
        assert delay.ToTimedelta().total_seconds() == 1.5


def test_an_engine_fault_during_the_request_is_internal_without_its_cause() -> None:
    engine = FakeEngine()
    engine.fail_with = api.EngineFatalError("device lost: HBM parity error at 0x7f00")
    error = _refused(engine, _request())
    assert error.code is grpc.StatusCode.INTERNAL
    assert error.message == INTERNAL_MESSAGE and "0x7f00" not in error.message


def test_the_callers_cancel_reaches_the_engine_and_the_request_yields_nothing_more() -> None:
    engine = FakeEngine()
    engine.hold = True
    cancels: list[Callable[[], None]] = []

    async def run() -> list[str]:
        generations, _ = _generations(engine)
        seen = []
        async for _, event in generations.run(_request(), None, cancels.append):
            seen.append(type(event).__name__)
            if isinstance(event, api.Progress):
                [cancel] = cancels  # what a door wires to its caller going away
                cancel()
        return seen

    seen = asyncio.run(run())
    assert engine.cancelled == [engine.requests[0].request_id]
    assert seen == ["Queued", "Progress"]  # the caller is gone: no image, no Finished is produced for it


def test_a_door_that_stops_reading_early_cancels_the_engine_request() -> None:
    engine = FakeEngine()
    engine.hold = True

    async def run() -> None:
        generations, admission = _generations(engine)
        events: AsyncIterator[tuple[Outcome, api.EngineEvent]] = generations.run(_request(), None)
        async for _, event in events:
            if isinstance(event, api.Progress):
                break
        await events.aclose()  # type: ignore[attr-defined]
        assert admission.in_flight == 0

    asyncio.run(run())
    assert engine.cancelled == [engine.requests[0].request_id]


class _SlowAdmission(FakeEngine):
    """A fake whose ``submit`` waits (in the service's worker thread) until the test lets it admit."""

    def __init__(self) -> None:
        super().__init__()
        self.submitting = threading.Event()
        self.admit = threading.Event()

    def submit(self, request: api.GenerationRequest, listener: api.Listener):  # type: ignore[no-untyped-def]
        self.submitting.set()
        self.admit.wait(30)
        return super().submit(request, listener)


def test_a_caller_gone_while_its_request_is_being_admitted_still_has_it_cancelled() -> None:
    engine = _SlowAdmission()
    engine.hold = True  # admitted requests would otherwise finish on their own

    async def run() -> None:
        generations, _ = _generations(engine)
        caller = asyncio.ensure_future(_events(generations, _request(request_id="gone-early")))
        await asyncio.to_thread(engine.submitting.wait, 30)
        caller.cancel()  # the caller leaves while the engine is still admitting (tokenizing) its request
        with pytest.raises(asyncio.CancelledError):
            await caller
        engine.admit.set()
        await asyncio.to_thread(engine.wait_for_cancel, "gone-early")

    asyncio.run(run())
    assert engine.cancelled == ["gone-early"]
