"""One place that decides what a caller sees when a request fails: status code, message, rich details.

Details follow google.rpc conventions (sent as ``grpc-status-details-bin``, read by grpcio-status):
BadRequest field violations for bad fields, RetryInfo when retrying later can help. INTERNAL errors carry
a fixed message: the cause (and any stack trace) goes to the server's log, never to the caller.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NoReturn

import grpc
import grpc.aio
from google.protobuf import any_pb2, duration_pb2, message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from sdxl_server.engine import api
from sdxl_server.service.request_conversion import ValidationError

INTERNAL_MESSAGE = "the server failed to process the request; it has been logged"


class ServiceError(Exception):
    """A failure to report to the caller as a gRPC status."""

    def __init__(self, code: grpc.StatusCode, message: str, details: Sequence[message.Message] = ()) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = tuple(details)

    def to_status(self) -> grpc.Status:
        packed = []
        for detail in self.details:
            any_detail = any_pb2.Any()
            any_detail.Pack(detail)
            packed.append(any_detail)
        proto = status_pb2.Status(code=self.code.value[0], message=self.message, details=packed)
        return rpc_status.to_status(proto)


def retry_info(seconds: float) -> error_details_pb2.RetryInfo:
    seconds = max(seconds, 0.0)
    whole = math.floor(seconds)
    delay = duration_pb2.Duration(seconds=whole, nanos=int((seconds - whole) * 1e9))
    return error_details_pb2.RetryInfo(retry_delay=delay)


def invalid_argument(violations: Sequence[tuple[str, str]]) -> ServiceError:
    bad_request = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=field, description=description)
            for field, description in violations
        ]
    )
    message = "; ".join(f"{field}: {description}" for field, description in violations)
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, message, [bad_request])


def from_validation(error: ValidationError) -> ServiceError:
    return invalid_argument([(v.field, v.description) for v in error.violations])


def unavailable(message: str, retry_after_seconds: float | None = None) -> ServiceError:
    details = [] if retry_after_seconds is None else [retry_info(retry_after_seconds)]
    return ServiceError(grpc.StatusCode.UNAVAILABLE, message, details)


def from_engine_error(error: BaseException) -> ServiceError:
    """Maps an engine error (or anything unexpected) to what the caller sees."""
    if isinstance(error, api.InvalidRequestError):
        return invalid_argument([(error.field, error.message)])
    if isinstance(error, api.AdapterNotFoundError):
        resource = error_details_pb2.ResourceInfo(
            resource_type="sdxl.v1.Adapter", resource_name=error.name, description=str(error)
        )
        return ServiceError(grpc.StatusCode.NOT_FOUND, str(error), [resource])
    if isinstance(error, api.QueueFullError):
        return ServiceError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"{error}; retry in {error.retry_after_seconds:.1f}s or on another replica",
            [retry_info(error.retry_after_seconds)],
        )
    if isinstance(error, api.DeadlineUnreachableError):
        return ServiceError(
            grpc.StatusCode.DEADLINE_EXCEEDED, str(error) or "the request cannot finish in time"
        )
    if isinstance(error, api.CancelledError):
        return ServiceError(grpc.StatusCode.CANCELLED, "the request was cancelled")
    if isinstance(error, api.NotReadyError):
        return unavailable(str(error) or "the server is not ready", retry_after_seconds=1.0)
    return ServiceError(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)


async def abort(context: grpc.aio.ServicerContext, error: ServiceError) -> NoReturn:
    status = error.to_status()
    await context.abort(status.code, status.details, status.trailing_metadata)
    raise AssertionError("context.abort returned")  # abort always raises
