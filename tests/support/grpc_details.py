"""What a test reads from a gRPC answer: the ImageService stub, rich error details, decoded images."""

from __future__ import annotations

import io

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from PIL import Image
from sdxl_client._proto.sdxl.v1 import sdxl_pb2, sdxl_pb2_grpc


def image_stub(channel: grpc.Channel) -> sdxl_pb2_grpc.ImageServiceStub:
    return sdxl_pb2_grpc.ImageServiceStub(channel)


def bad_request_fields(error: grpc.RpcError) -> dict[str, str]:
    """field -> description of the google.rpc.BadRequest detail of a failed call."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, f"no rich status details on {error}"
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            return {v.field: v.description for v in bad_request.field_violations}
    raise AssertionError(f"no BadRequest detail in {status}")


def retry_delay_seconds(error: grpc.RpcError) -> float:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, f"no rich status details on {error}"
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info.retry_delay.seconds + info.retry_delay.nanos / 1e9
    raise AssertionError(f"no RetryInfo detail in {status}")


def decode(image: sdxl_pb2.Image) -> Image.Image:
    decoded = Image.open(io.BytesIO(image.data))
    decoded.load()
    return decoded
