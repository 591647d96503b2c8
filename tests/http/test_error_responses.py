"""How a gRPC status becomes an HTTP response in OpenAI's error shape (no server needed)."""

from __future__ import annotations

import json

import grpc
import pytest
from sdxl_server.engine import api
from sdxl_server.service import status_mapping as errors
from sdxl_server.service.http.error_responses import error_response
from sdxl_server.service.http.images_request import field_name


def _body(response) -> dict:
    return json.loads(response.body)["error"]


def test_a_bad_field_is_400_naming_it_in_the_callers_words() -> None:
    error = errors.invalid_argument([("num_images", "5 is more than the 4 allowed"), ("width", "not served")])
    response = error_response(error, field_name)
    body = _body(response)
    assert response.status == 400 and body["param"] == "n"
    assert body["message"] == "n: 5 is more than the 4 allowed; size: not served"
    assert (body["type"], body["code"]) == ("invalid_request_error", "invalid_argument")


def test_a_full_queue_is_429_with_the_retry_delay_in_whole_seconds_and_milliseconds() -> None:
    response = error_response(
        errors.from_engine_error(api.QueueFullError("queue full", retry_after_seconds=2.5))
    )
    assert response.status == 429
    assert (response.headers["Retry-After"], response.headers["retry-after-ms"]) == ("3", "2500")
    assert _body(response)["code"] == "resource_exhausted"


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (errors.unavailable("the server is warming up", 1.0), 503, "unavailable"),
        (errors.from_engine_error(api.DeadlineUnreachableError("too late")), 504, "deadline_exceeded"),
        (
            errors.ServiceError(grpc.StatusCode.UNAUTHENTICATED, "missing bearer token"),
            401,
            "unauthenticated",
        ),
        (errors.from_engine_error(RuntimeError("a secret stack")), 500, "internal"),
    ],
)
def test_each_status_has_its_http_code(error, status, code) -> None:
    response = error_response(error)
    body = _body(response)
    assert (response.status, body["code"]) == (status, code)
    if status == 500:  # the cause stays in the server's log
        assert body["message"] == errors.INTERNAL_MESSAGE and body["type"] == "server_error"
    if status == 401:
        assert response.headers["WWW-Authenticate"] == "Bearer"
    if status == 503:
        assert response.headers["Retry-After"] == "1"
