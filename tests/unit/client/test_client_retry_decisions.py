"""The client's retry decision for RESOURCE_EXHAUSTED (sdxl_client._errors, sdxl_client._retry): retried
only with the server's RetryInfo, never for a message that was too large."""

from __future__ import annotations

import grpc
import pytest
from sdxl_client import MessageTooLarge, Overloaded, RetryPolicy
from sdxl_client._errors import from_rpc_error
from sdxl_client._retry import RetryState


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
