"""What an HTTP caller sees for a failed request: the gRPC status mapped to HTTP, in OpenAI's error shape.

The status comes from the same ServiceError the gRPC door sends (service/errors.py), so both doors agree
on why a request failed: INVALID_ARGUMENT is 400 and names the field (OpenAI's ``param``, in the names the
caller sent), UNAUTHENTICATED 401, RESOURCE_EXHAUSTED 429 and UNAVAILABLE 503 with ``Retry-After`` (whole
seconds, as RFC 9110 wants) and ``retry-after-ms`` (the openai client reads it first), DEADLINE_EXCEEDED
504, INTERNAL 500 with the fixed message. The body is ``{"error": {"message", "type", "param", "code"}}``
with ``code`` the gRPC status name in lower case.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import grpc
from aiohttp import web
from google.rpc import error_details_pb2

from sdxl_server.service.status_mapping import ServiceError

_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    # nginx's "client closed request": nobody reads it, but the access log and the handler agree.
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
_ERROR_TYPE = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    429: "rate_limit_error",
}


def http_status(code: grpc.StatusCode) -> int:
    return _HTTP_STATUS.get(code, 500)


def error_response(error: ServiceError, field_name: Callable[[str], str] = str) -> web.Response:
    """The HTTP response for ``error``; ``field_name`` renames fields into the caller's vocabulary."""
    status = http_status(error.code)
    message, param = error.message, None
    headers: dict[str, str] = {}
    for detail in error.details:
        if isinstance(detail, error_details_pb2.BadRequest) and detail.field_violations:
            violations = [(field_name(v.field), v.description) for v in detail.field_violations]
            message = "; ".join(f"{field}: {description}" for field, description in violations)
            param = violations[0][0]
        elif isinstance(detail, error_details_pb2.RetryInfo):
            seconds = detail.retry_delay.seconds + detail.retry_delay.nanos / 1e9
            headers["Retry-After"] = str(max(1, math.ceil(seconds)))
            headers["retry-after-ms"] = str(max(1, round(seconds * 1000)))
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return error_json(status, message, param, error.code.name.lower(), headers)


def error_json(
    status: int, message: str, param: str | None, code: str, headers: dict[str, str] | None = None
) -> web.Response:
    error_type = _ERROR_TYPE.get(status, "server_error" if status >= 500 else "invalid_request_error")
    body = {"error": {"message": message, "type": error_type, "param": param, "code": code}}
    return web.json_response(body, status=status, headers=headers)
