"""Bearer-token authentication for every RPC except health checks.

Kubernetes gRPC probes cannot send metadata, so ``grpc.health.v1.Health`` stays open; everything else
(the image service and reflection) needs ``authorization: Bearer <token>``. The comparison takes constant
time so that the token cannot be guessed byte by byte from response times.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import grpc.aio

EXEMPT_PREFIXES = ("/grpc.health.v1.Health/",)
_SCHEME = "bearer "


def _bearer_token(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key.lower() == "authorization" and isinstance(value, str) and value.lower().startswith(_SCHEME):
            return value[len(_SCHEME) :].strip()
    return None


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, token: str, on_reject: Callable[[str], None] | None = None) -> None:
        """``on_reject(method)`` is told about every rejected call (for metrics)."""
        self._token = token.encode()
        self._on_reject = on_reject

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method: str = handler_call_details.method
        handler = await continuation(handler_call_details)
        if handler is None or method.startswith(EXEMPT_PREFIXES):
            return handler
        token = _bearer_token(handler_call_details.invocation_metadata)
        if token is not None and hmac.compare_digest(token.encode(), self._token):
            return handler
        if self._on_reject is not None:
            self._on_reject(method)
        message = "missing bearer token" if token is None else "wrong bearer token"
        return _denying_handler(handler, message)


def _denying_handler(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that fails with UNAUTHENTICATED."""

    async def deny(_request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(
            grpc.StatusCode.UNAUTHENTICATED, f"{message}: send 'authorization: Bearer <token>'"
        )

    codecs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(deny, **codecs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(deny, **codecs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(deny, **codecs)
    return grpc.stream_stream_rpc_method_handler(deny, **codecs)
