"""What a caller sees for each engine error: status code, message, and google.rpc details."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2, status_pb2
from sdxl_server.engine import api
from sdxl_server.service.status_mapping import INTERNAL_MESSAGE, from_engine_error


def _detail(error, kind):
    """The ``kind`` detail of the status a caller receives (as grpcio-status sends it)."""
    status = error.to_status()
    proto = status_pb2.Status.FromString(dict(status.trailing_metadata)["grpc-status-details-bin"])
    assert proto.code == status.code.value[0]
    for detail in proto.details:
        if detail.Is(kind.DESCRIPTOR):
            unpacked = kind()
            detail.Unpack(unpacked)
            return unpacked
    raise AssertionError(f"no {kind.__name__} in {proto}")


def test_invalid_request_names_the_field_in_bad_request_details() -> None:
    error = from_engine_error(api.InvalidRequestError("seed", "too large"))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and "seed" in error.message
    violations = _detail(error, error_details_pb2.BadRequest).field_violations
    assert [(v.field, v.description) for v in violations] == [("seed", "too large")]


def test_queue_full_is_resource_exhausted_with_a_retry_delay() -> None:
    error = from_engine_error(api.QueueFullError("queue full (8 images)", retry_after_seconds=2.5))
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    delay = _detail(error, error_details_pb2.RetryInfo).retry_delay
    assert (delay.seconds, delay.nanos) == (2, 500_000_000)


def test_each_engine_error_has_its_code() -> None:
    assert from_engine_error(api.DeadlineUnreachableError("late")).code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert from_engine_error(api.CancelledError()).code == grpc.StatusCode.CANCELLED
    assert from_engine_error(api.NotReadyError("warming up")).code == grpc.StatusCode.UNAVAILABLE


def test_engine_faults_are_internal_without_their_cause_or_stack() -> None:
    try:
        raise RuntimeError("device 3 fell off the bus")
    except RuntimeError as cause:
        fatal = api.EngineFatalError("XLA error: Traceback (most recent call last) ...")
        fatal.__cause__ = cause
        for error in (from_engine_error(fatal), from_engine_error(cause)):
            assert error.code == grpc.StatusCode.INTERNAL
            assert error.message == INTERNAL_MESSAGE
            assert "Traceback" not in error.to_status().details and "device 3" not in error.message
