"""The hardening pieces on their own, with fake clocks (no server): token re-reads, the quiet wait before
stopping gRPC, and the client's retry decision for RESOURCE_EXHAUSTED with and without RetryInfo."""

from __future__ import annotations

import asyncio
import os

import grpc
import pytest
from sdxl_client import MessageTooLarge, Overloaded, RetryPolicy
from sdxl_client._errors import from_rpc_error
from sdxl_client._retry import RetryState
from sdxl_server.service.auth import TokenFile, TokenFileError
from sdxl_server.service.grpc_server import CallArrivals


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_token_file_is_looked_at_again_only_after_the_recheck_interval(tmp_path) -> None:
    path = tmp_path / "token"
    path.write_text("one\n\n  two  \n")
    clock = _Clock()
    tokens = TokenFile(str(path), recheck_seconds=1.0, clock=clock)
    assert tokens.accepts("one") and tokens.accepts("two") and not tokens.accepts("three")
    path.write_text("three\n")
    os.utime(path, ns=(1, 1))  # a different mtime even on a coarse clock
    clock.now += 0.5
    assert not tokens.accepts("three")  # within the interval: the cached tokens
    clock.now += 0.5
    assert tokens.accepts("three") and not tokens.accepts("one")


def test_a_missing_or_empty_token_file_keeps_the_tokens_that_worked(tmp_path) -> None:
    path = tmp_path / "token"
    path.write_text("kept")
    clock = _Clock()
    tokens = TokenFile(str(path), clock=clock)
    path.unlink()
    clock.now += 2
    assert tokens.accepts("kept")
    path.write_text("   \n")
    clock.now += 2
    assert tokens.accepts("kept")


def test_an_empty_token_file_is_refused_at_start(tmp_path) -> None:
    path = tmp_path / "token"
    path.write_text("\n")
    with pytest.raises(TokenFileError, match="holds no token"):
        TokenFile(str(path))


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


class _FailedCall(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple:
        return ()


def test_resource_exhausted_without_retry_info_is_never_retried() -> None:
    too_large = from_rpc_error(
        _FailedCall(grpc.StatusCode.RESOURCE_EXHAUSTED, "SERVER: Received message larger than max (5 vs. 4)")
    )
    other = from_rpc_error(_FailedCall(grpc.StatusCode.RESOURCE_EXHAUSTED, "quota exceeded"))
    assert isinstance(too_large, MessageTooLarge) and not too_large.retryable
    assert isinstance(other, Overloaded) and other.retry_after is None and not other.retryable
    state = RetryState(RetryPolicy(max_attempts=5), None)
    state.start_attempt()
    assert state.delay_before_retry(too_large) is None
    assert state.delay_before_retry(other) is None
    assert state.delay_before_retry(Overloaded("queue full", retry_after=0.5)) == pytest.approx(0.5, abs=0.1)
