"""Raw gRPC calls for the hostile suite: bodies sent as given bytes, outcomes as plain values."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

GENERATE = "/sdxl.v1.ImageService/Generate"
GENERATE_STREAM = "/sdxl.v1.ImageService/GenerateStream"
SERVER_INFO = "/sdxl.v1.ImageService/GetServerInfo"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
# The token of the suite's shared server (conftest.py).
TOKEN = "hostile-suite-token"


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


@dataclasses.dataclass(frozen=True)
class Outcome:
    code: grpc.StatusCode
    details: str
    responses: tuple[bytes, ...]
    violations: dict[str, str]  # google.rpc.BadRequest field -> description
    retry_delay: float | None  # google.rpc.RetryInfo, seconds


def _from_error(error: grpc.RpcError) -> Outcome:
    violations: dict[str, str] = {}
    retry_delay = None
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            violations.update({v.field: v.description for v in bad_request.field_violations})
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            retry_delay = info.retry_delay.seconds + info.retry_delay.nanos / 1e9
    return Outcome(error.code(), error.details() or "", (), violations, retry_delay)


def call(
    channel: grpc.Channel,
    method: str,
    body: bytes,
    metadata: Sequence[tuple[str, str]] = (),
    timeout: float = 60.0,
) -> Outcome:
    """Sends ``body`` unchanged (identity serializers) to a unary or server-streaming method."""
    try:
        if method == GENERATE_STREAM:
            responses = tuple(channel.unary_stream(method)(body, metadata=metadata, timeout=timeout))
        else:
            responses = (channel.unary_unary(method)(body, metadata=metadata, timeout=timeout),)
    except grpc.RpcError as e:
        return _from_error(e)
    return Outcome(grpc.StatusCode.OK, "", responses, {}, None)
