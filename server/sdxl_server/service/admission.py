"""Who may start a generation: the serving gate (warming up / serving / draining) and deadline checks.

The gate counts the generation RPCs it let in, so that a drain can wait for exactly the accepted work.
The admission queue itself is the engine's (bounded, in images): ``engine.submit`` raises QueueFullError
at once when it is full, atomically with respect to other submitters.

Deadline-aware admission: before a request is submitted, the engine's estimate of how long it would take
(queue ahead of it + its own steps at the measured step time) is compared with the caller's deadline. A
request that cannot make it is rejected with DEADLINE_EXCEEDED before it costs any device time. The
engine re-checks deadlines while requests wait, for the ones that expire in the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections.abc import Callable, Iterator

import grpc

from sdxl_server.engine.api import GenerationRequest
from sdxl_server.service.errors import ServiceError, unavailable

# Clients should retry elsewhere (or here, after this long) while the server warms up or drains.
_RETRY_AFTER_SECONDS = 1.0


class ServingState(enum.Enum):
    STARTING = "starting"
    SERVING = "serving"
    DRAINING = "draining"


Estimator = Callable[[int, int], float | None]


class Admission:
    """Used from the event loop's thread only."""

    def __init__(self, estimate_seconds: Estimator) -> None:
        self._estimate_seconds = estimate_seconds
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

    def check_deadline(self, request: GenerationRequest, time_remaining: float | None) -> None:
        """Raises DEADLINE_EXCEEDED when the request cannot finish within ``time_remaining`` seconds."""
        if time_remaining is None:
            return
        if time_remaining <= 0:
            raise ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline had passed on arrival")
        estimate = self._estimate_seconds(request.num_images, request.steps)
        if estimate is not None and estimate > time_remaining:
            raise ServiceError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"the request would need about {estimate:.2f}s (queue and {request.num_images} x "
                f"{request.steps} steps at the measured step time) but its deadline is in "
                f"{time_remaining:.2f}s; it was not started",
            )
