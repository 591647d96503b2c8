"""Who may start a generation: the serving gate (warming up / serving / draining) and deadline checks.

The gate counts the generation RPCs it let in, so that a drain can wait for exactly the accepted work.
The admission queue itself is the engine's (bounded, in images): ``engine.submit`` raises QueueFullError
at once when it is full, atomically with respect to other submitters.

Before a request is submitted, in this order: a deadline shorter than the request's own steps would take
on an idle server is DEADLINE_EXCEEDED (final: retrying cannot help); a full queue is RESOURCE_EXHAUSTED
with a retry delay (another replica, or this one a little later, can take it); a deadline that the work
queued ahead makes unreachable (the engine's estimate: queue + own steps at the measured step time) is
DEADLINE_EXCEEDED. Either way the request costs no device time.

The queue check reads the engine's lock-free stats snapshot, so that an overload is turned away without
taking any engine lock or running the tokenizer (measured on an H200: rejections at p99 9-21 ms this way,
100-300 ms when every rejection went through ``engine.submit``). The engine publishes the snapshot at
each step boundary before delivering that boundary's events, so a caller never sees a queue state older
than the events it has received; ``engine.submit`` still makes the authoritative, atomic check.
The engine re-checks the deadlines of queued requests.

Every request that reaches these checks is counted as arriving work (``sdxl_demand``, service/demand.py)
before they decide, so that what they refuse still reaches the autoscaler.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections.abc import Iterator

import grpc

from sdxl_server.engine.api import Engine, EngineStats, GenerationRequest
from sdxl_server.engine.batching.guidance_rows import guided_steps, peak_rows
from sdxl_server.engine.request_budget import own_seconds
from sdxl_server.service.demand import DemandMeter
from sdxl_server.service.status_mapping import ServiceError, retry_info, unavailable

# Clients should retry elsewhere (or here, after this long) while the server warms up or drains.
_RETRY_AFTER_SECONDS = 1.0


class ServingState(enum.Enum):
    STARTING = "starting"
    SERVING = "serving"
    DRAINING = "draining"


# Bounds of the retry delay suggested with RESOURCE_EXHAUSTED.
_MIN_RETRY_SECONDS, _MAX_RETRY_SECONDS = 0.1, 60.0


class Admission:
    """Used from the event loop's thread only."""

    def __init__(self, engine: Engine, max_queue: int, demand: DemandMeter | None = None) -> None:
        self._engine = engine
        self._max_queue = max_queue
        self._demand = demand
        self._state = ServingState.STARTING
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def state(self) -> ServingState:
        return self._state

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def mark_serving(self) -> None:
        if self._state is ServingState.STARTING:
            self._state = ServingState.SERVING

    def begin_drain(self) -> None:
        """From now on new requests get UNAVAILABLE; the ones already admitted continue."""
        self._state = ServingState.DRAINING

    async def wait_idle(self, timeout: float) -> bool:
        """Waits until no admitted request is in flight; False if that took longer than ``timeout``."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def check_serving(self) -> None:
        if self._state is ServingState.STARTING:
            raise unavailable("the server is warming up", _RETRY_AFTER_SECONDS)
        if self._state is ServingState.DRAINING:
            raise unavailable("the server is shutting down; retry on another replica", _RETRY_AFTER_SECONDS)

    @contextlib.contextmanager
    def admitted(self) -> Iterator[None]:
        """Holds one in-flight place for the duration of an RPC; raises UNAVAILABLE if not serving."""
        self.check_serving()
        self._in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    def served(self, request: GenerationRequest, denoise_seconds: float) -> None:
        """An admitted request finished: its denoising time prices demand's work (service/demand.py)."""
        if self._demand is not None:
            self._demand.served(request, denoise_seconds)

    def check(self, request: GenerationRequest, time_remaining: float | None, attempt: int = 1) -> None:
        """Raises DEADLINE_EXCEEDED or RESOURCE_EXHAUSTED when the request should not be submitted.

        ``time_remaining``: seconds until the caller's deadline (None: no deadline); ``attempt``: the
        client's attempt number (only first attempts count as demand).
        """
        if self._demand is not None:
            self._demand.arrived(request, attempt)
        if time_remaining is not None and time_remaining <= 0:
            raise _deadline_error("the deadline had passed on arrival")
        stats = self._engine.stats()  # a lock-free snapshot: overload is answered without touching the engine
        # A deadline too short even for an idle server is final: retrying (the overload answer) cannot help.
        # Both counted in UNet rows: an unguided image takes half a guided one's (request_budget.py).
        rows = peak_rows(guided_steps(request.guidance_scale, request.guidance_interval, request.steps))
        own = own_seconds(stats, request.num_images, request.steps, rows, request.resolution)
        if time_remaining is not None and own is not None and own > time_remaining:
            raise _deadline_error(
                f"{request.num_images} x {request.steps} steps take about {own:.2f}s even on an "
                f"idle server, but the deadline is in {time_remaining:.2f}s; it was not started"
            )
        if stats.queue_depth + request.num_images > self._max_queue:
            raise self._queue_full(stats)
        if time_remaining is None:
            return
        estimate = self._engine.estimate_seconds(request.num_images, request.steps, request.resolution, rows)
        if estimate is not None and estimate > time_remaining:
            raise _deadline_error(
                f"the request would need about {estimate:.2f}s (queue and {request.num_images} x "
                f"{request.steps} steps at the measured step time) but its deadline is in "
                f"{time_remaining:.2f}s; it was not started"
            )

    def _queue_full(self, stats: EngineStats) -> ServiceError:
        # When the engine expects a queue place to open (its published estimate, the same one engine.submit
        # puts in its own QueueFullError): read from the snapshot, so rejecting costs no engine lock.
        retry_seconds = min(max(stats.retry_after_seconds, _MIN_RETRY_SECONDS), _MAX_RETRY_SECONDS)
        return ServiceError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"admission queue full ({stats.queue_depth} of {self._max_queue} images waiting); retry in "
            f"{retry_seconds:.1f}s or on another replica",
            [retry_info(retry_seconds)],
        )


def _deadline_error(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, message)
