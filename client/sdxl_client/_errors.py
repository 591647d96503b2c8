"""Exceptions raised by the clients: one class per meaning, built from gRPC errors in one place.

A caller branches on the class (``except Overloaded``), not on a status string. Every class carries the
gRPC ``code`` it came from and says whether retrying the same request may succeed (``retryable``). The
server's rich details (``google.rpc.BadRequest`` field violations, ``google.rpc.RetryInfo``) are decoded
here from the ``grpc-status-details-bin`` trailer, which sync and asyncio errors expose alike.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import grpc
from google.rpc import error_details_pb2, status_pb2

__all__ = [
    "Cancelled",
    "DeadlineExceeded",
    "FieldViolation",
    "Internal",
    "InvalidRequest",
    "MessageTooLarge",
    "Overloaded",
    "PermissionDenied",
    "SdxlError",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "from_rpc_error",
]

_DETAILS_KEY = "grpc-status-details-bin"
_TOO_LARGE = "message larger than max"  # "Received ..." / "Sent message larger than max (N vs. M)"


@dataclass(frozen=True)
class FieldViolation:
    """One rejected request field.

    Attributes:
        field: The request field's name, e.g. ``"steps"``.
        description: Why it was rejected.
    """

    field: str
    description: str


class SdxlError(Exception):
    """Base class of every error the clients raise.

    Attributes:
        code: The gRPC status code of the failure.
        retryable: Whether sending the same request again may succeed.
        message: The server's (or the client's) human-readable explanation.
        retry_after: Seconds the server asked the caller to wait before retrying (``google.rpc.RetryInfo``,
            sent with RESOURCE_EXHAUSTED and while a server warms up or drains), or ``None``.
    """

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN
    retryable: bool = False  # a class's default; an instance may know better (see Overloaded)

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after: float | None = None
        if code is not None:
            # Only the generic fallback gets a per-instance code; subclasses keep their class's code.
            self.code = code  # type: ignore[misc]

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


class InvalidRequest(SdxlError):
    """A request field is missing or out of bounds (INVALID_ARGUMENT). Fix the request; never retried.

    Attributes:
        violations: Every rejected field, as the server (or the client) reported them.
        field: The first rejected field's name, or ``None`` when the server named none.
    """

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, message: str, violations: Iterable[FieldViolation] = ()) -> None:
        super().__init__(message)
        self.violations: tuple[FieldViolation, ...] = tuple(violations)

    @property
    def field(self) -> str | None:
        return self.violations[0].field if self.violations else None


class Overloaded(SdxlError):
    """The server's admission queue is full (RESOURCE_EXHAUSTED). Retryable after ``retry_after``.

    Only with a ``retry_after``: the server always sends a RetryInfo delay with its "queue full". A
    RESOURCE_EXHAUSTED without one comes from elsewhere (a proxy's quota, a limit in grpc itself) and
    is not retried, since nothing says that the same request would fare better later.
    """

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.retryable = retry_after is not None


class MessageTooLarge(SdxlError):
    """A message was larger than a gRPC size limit (RESOURCE_EXHAUSTED without RetryInfo). Never retried.

    The request was larger than the server accepts (1 MiB; no valid request comes close), or larger
    than this client sends, or the response larger than this client accepts. The message says which
    and gives both sizes, e.g. ``SERVER: Received message larger than max (5242885 vs. 1048576)``.
    """

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(SdxlError):
    """No server could take the call: unreachable, warming up or draining (UNAVAILABLE). Retryable."""

    code = grpc.StatusCode.UNAVAILABLE
    retryable = True


class DeadlineExceeded(SdxlError):
    """The call could not finish before its deadline (DEADLINE_EXCEEDED). Not retried: no time is left."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unauthenticated(SdxlError):
    """The bearer token is missing or wrong (UNAUTHENTICATED)."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(SdxlError):
    """The caller is authenticated but not allowed (PERMISSION_DENIED)."""

    code = grpc.StatusCode.PERMISSION_DENIED


class Cancelled(SdxlError):
    """The call was cancelled, by the caller or the server (CANCELLED)."""

    code = grpc.StatusCode.CANCELLED


class Unimplemented(SdxlError):
    """The server does not implement the method (UNIMPLEMENTED): a version mismatch."""

    code = grpc.StatusCode.UNIMPLEMENTED


class Internal(SdxlError):
    """The server failed while serving the request (INTERNAL, UNKNOWN, DATA_LOSS)."""

    code = grpc.StatusCode.INTERNAL


_SIMPLE_CLASSES: dict[grpc.StatusCode, type[SdxlError]] = {
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.UNIMPLEMENTED: Unimplemented,
    grpc.StatusCode.INTERNAL: Internal,
    grpc.StatusCode.DATA_LOSS: Internal,
}


def from_rpc_error(error: grpc.RpcError) -> SdxlError:
    """Translates a gRPC error (sync or asyncio) into the matching :class:`SdxlError` subclass.

    Args:
        error: A failed call as raised by grpc (``grpc.RpcError`` that is also a ``grpc.Call``, or
            ``grpc.aio.AioRpcError``).

    Returns:
        The exception to raise; the original error should be chained as its cause.
    """
    code = _call_attr(error, "code") or grpc.StatusCode.UNKNOWN
    message = _call_attr(error, "details") or code.name
    details = _rich_details(_call_attr(error, "trailing_metadata"))
    delays = [
        d.retry_delay.ToTimedelta().total_seconds()
        for d in details
        if isinstance(d, error_details_pb2.RetryInfo)
    ]
    retry_after = delays[0] if delays else None
    result: SdxlError
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        violations = [
            FieldViolation(v.field, v.description)
            for detail in details
            if isinstance(detail, error_details_pb2.BadRequest)
            for v in detail.field_violations
        ]
        result = InvalidRequest(message, violations)
    elif code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        # grpc's own wording, on either side, for a message over the limit; never sent with RetryInfo.
        too_large = retry_after is None and _TOO_LARGE in message
        result = MessageTooLarge(message) if too_large else Overloaded(message, retry_after)
    elif code in _SIMPLE_CLASSES:
        result = _SIMPLE_CLASSES[code](message)
    else:
        result = SdxlError(message, code=code)
    if retry_after is not None:
        result.retry_after = retry_after
    return result


def _call_attr(error: grpc.RpcError, name: str) -> Any:
    method = getattr(error, name, None)
    return method() if callable(method) else None


def _rich_details(trailing_metadata: Any) -> list[Any]:
    """Decodes the ``google.rpc.Status`` details (BadRequest, RetryInfo) carried in the trailers."""
    for key, value in trailing_metadata or ():
        if key != _DETAILS_KEY:
            continue
        try:
            status = status_pb2.Status.FromString(value)
        except Exception:  # a malformed trailer must not hide the real error
            return []
        decoded = []
        for any_detail in status.details:
            for message_class in (error_details_pb2.BadRequest, error_details_pb2.RetryInfo):
                if any_detail.Is(message_class.DESCRIPTOR):
                    message = message_class()
                    any_detail.Unpack(message)
                    decoded.append(message)
        return decoded
    return []
