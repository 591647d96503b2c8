"""Requests that cannot be decoded end INVALID_ARGUMENT, counted, with one short log line.

Left to grpc, a body that is not a valid protobuf (corrupt wire format, a string field that is not
UTF-8) raises DecodeError inside the library: the caller gets UNKNOWN, the log a traceback per call, and
no handler runs to count it. This interceptor gives every unary-request method a deserializer that
catches the error and returns an ``Undecodable`` marker instead, and a behavior that answers that marker
with INVALID_ARGUMENT (a ``BadRequest`` naming the field ``request``) before the servicer sees it. The
log gets one short line, rate-limited like every rejection (``request_log.RejectionLog``): a flood of
garbage is one line and a count per 10 s.
Streaming-request methods (only reflection, which needs a token when auth is on) are left as they are.

The guarded handler of each method is built once and reused: the methods are fixed at start-up.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import grpc.aio
from google.protobuf.message import DecodeError

from sdxl_server.service import status_mapping as errors
from sdxl_server.service.request_log import RejectionLog


@dataclasses.dataclass(frozen=True)
class Undecodable:
    """Stands for a request body that is not a valid message of the method's type."""

    size: int
    reason: str


def _safe_deserializer(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserializer(raw: bytes) -> Any:
        try:
            return deserialize(raw)
        except DecodeError as e:
            # upb's message: "Error parsing message with type 'X': String field had bad UTF-8"
            return Undecodable(len(raw), str(e).rpartition(": ")[2] or "not a valid protobuf message")

    return deserializer


def undecodable_error(request: Undecodable, method: str) -> errors.ServiceError:
    name = method.rsplit("/", 1)[-1]
    return errors.invalid_argument(
        [("request", f"the {request.size}-byte {name} body cannot be decoded: {request.reason}")]
    )


class DecodeGuardInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, on_undecodable: Callable[[str], None] | None = None) -> None:
        """``on_undecodable(method)`` is told about every call rejected for its body (for metrics)."""
        self._on_undecodable = on_undecodable
        self._rejections = RejectionLog()
        self._guarded: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method: str = handler_call_details.method
        guarded = self._guarded.get(method)
        if guarded is not None:
            return guarded
        handler = await continuation(handler_call_details)
        if handler is None:
            return None  # unknown methods are not remembered: callers choose their names
        guarded = self._guard(method, handler)
        self._guarded[method] = guarded
        return guarded

    def _reject(self, method: str, request: Undecodable) -> errors.ServiceError:
        error = undecodable_error(request, method)
        self._rejections.record(error)
        if self._on_undecodable is not None:
            self._on_undecodable(method)
        return error

    def _guard(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if handler.request_streaming or handler.request_deserializer is None:
            return handler
        behavior = handler.unary_unary or handler.unary_stream
        codecs = {
            "request_deserializer": _safe_deserializer(handler.request_deserializer),
            "response_serializer": handler.response_serializer,
        }
        if inspect.isasyncgenfunction(behavior):  # e.g. GenerateStream: responses are yielded

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                if isinstance(request, Undecodable):
                    await errors.abort(context, self._reject(method, request))
                # Closed at once when the stream ends early, so the servicer's cleanup (cancelling the
                # engine request) runs then, not whenever the garbage collector gets to it.
                async with contextlib.aclosing(behavior(request, context)) as responses:
                    async for response in responses:
                        yield response

            return grpc.unary_stream_rpc_method_handler(stream, **codecs)
        if not inspect.iscoroutinefunction(behavior):
            return handler  # a synchronous behavior: none is registered here

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, Undecodable):
                await errors.abort(context, self._reject(method, request))
            return await behavior(request, context)

        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(call, **codecs)
        return grpc.unary_stream_rpc_method_handler(call, **codecs)
