"""The quiet wait before stopping gRPC (sdxl_server.service.grpc_server.CallArrivals), with a fake clock:
it ends once no call arrived for the quiet time, or at its bound."""

from __future__ import annotations

import asyncio

import pytest
from sdxl_server.service.grpc_server import CallArrivals


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_quiet_wait_ends_once_no_call_arrived_for_the_quiet_time_or_at_its_bound() -> None:
    clock = _Clock()

    async def sleep(seconds: float) -> None:  # time passes only when the wait sleeps
        clock.now += seconds

    arrivals = CallArrivals(clock, sleep)

    async def arrive() -> None:
        async def continuation(_details):
            return None

        await arrivals.intercept_service(continuation, None)

    async def scenario() -> None:
        assert await arrivals.wait_quiet(0.25, 2.0)  # nothing ever arrived
        await arrive()
        started = clock.now
        assert await arrivals.wait_quiet(0.25, 2.0)
        assert clock.now - started == pytest.approx(0.25)  # slept exactly until quiet
        await arrive()
        started = clock.now
        assert not await arrivals.wait_quiet(10.0, 2.0)  # never quiet long enough: gives up at the bound
        assert clock.now - started == pytest.approx(2.0)

    asyncio.run(scenario())
