"""Bearer-token authentication for every RPC except health checks, decided before any request is decoded.

Kubernetes gRPC probes cannot send metadata, so ``grpc.health.v1.Health`` stays open; everything else
(the image service, reflection, and methods that do not exist) needs ``authorization: Bearer <token>``.
The check reads only the call's metadata: a rejected call's body is never deserialized, so that an
unauthenticated caller cannot reach the decoder (nor fill the log with its errors). The comparison takes
constant time so that a token cannot be guessed byte by byte from response times.

Tokens come from a file, one per line, any of them accepted: a rotation can add the new token next to
the old one, move the clients over, then drop the old one, without a restart. The file is looked at
again at most once a second (one ``stat``; re-read only when its inode, size or mtime changed), which
is how a Kubernetes Secret mounted as a volume arrives: the kubelet swaps the files in place.
"""

from __future__ import annotations

import hmac
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import grpc.aio

log = logging.getLogger(__name__)

EXEMPT_PREFIXES = ("/grpc.health.v1.Health/",)
_SCHEME = "bearer "
# How stale the tokens may be after the file changed: bounds rotation delay, and keeps the hot path to
# one clock read per call.
RECHECK_SECONDS = 1.0


class TokenFileError(ValueError):
    """The token file cannot be read or holds no token."""


def read_tokens(path: str) -> tuple[bytes, ...]:
    """The tokens in ``path``, one per line (blank lines and surrounding spaces ignored)."""
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError as e:
        raise TokenFileError(f"{path}: {e.strerror or e}") from None
    tokens = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not tokens:
        raise TokenFileError(f"{path} holds no token")
    return tokens


class TokenFile:
    """The accepted tokens, re-read when the file changes. Used from the event loop's thread."""

    def __init__(
        self, path: str, recheck_seconds: float = RECHECK_SECONDS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        """Reads the file now; raises TokenFileError if it is unreadable or empty."""
        self._path = path
        self._recheck_seconds = recheck_seconds
        self._clock = clock
        self._identity = self._stat()
        self._tokens = read_tokens(path)
        self._checked_at = clock()

    def _stat(self) -> tuple[int, int, int, int] | None:
        try:
            st = os.stat(self._path)  # follows the symlinks a mounted Secret is made of
        except OSError:
            return None
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def tokens(self) -> tuple[bytes, ...]:
        now = self._clock()
        if now - self._checked_at >= self._recheck_seconds:
            self._checked_at = now
            self._refresh()
        return self._tokens

    def accepts(self, token: str) -> bool:
        """Whether ``token`` is one of the accepted tokens (constant time in the token's content)."""
        given = token.encode()
        # Every candidate is compared (no early exit), so timing does not tell which one matched.
        matches = [hmac.compare_digest(given, candidate) for candidate in self.tokens()]
        return any(matches)

    def _refresh(self) -> None:
        identity = self._stat()
        if identity is None or identity == self._identity:
            return  # a file missing for a moment (mid-swap) keeps the tokens that worked
        try:
            tokens = read_tokens(self._path)
        except TokenFileError as e:
            log.warning("keeping the previous auth tokens: %s", e)
            return
        self._identity = identity
        if tokens != self._tokens:
            self._tokens = tokens
            log.info("auth tokens re-read from %s (%d accepted)", self._path, len(tokens))


def bearer_token(metadata: Any) -> str | None:
    """The token of an ``authorization: Bearer <token>`` entry in gRPC metadata (key, value pairs)."""
    for key, value in metadata or ():
        if key.lower() == "authorization" and isinstance(value, str) and value.lower().startswith(_SCHEME):
            return value[len(_SCHEME) :].strip()
    return None


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, tokens: TokenFile, on_reject: Callable[[str], None] | None = None) -> None:
        """``on_reject(method)`` is told about every rejected call of an existing method (for metrics)."""
        self._tokens = tokens
        self._on_reject = on_reject

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method: str = handler_call_details.method
        if method.startswith(EXEMPT_PREFIXES):
            return await continuation(handler_call_details)
        token = bearer_token(handler_call_details.invocation_metadata)
        if token is not None and self._tokens.accepts(token):
            return await continuation(handler_call_details)
        # Looking the handler up only learns the method's shape; nothing is read from the call yet.
        handler = await continuation(handler_call_details)
        if handler is not None and self._on_reject is not None:
            self._on_reject(method)  # only known methods: callers must not be able to mint metric labels
        message = "missing bearer token" if token is None else "wrong bearer token"
        return _denying_handler(handler, message)


def _denying_handler(handler: grpc.RpcMethodHandler | None, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that fails with UNAUTHENTICATED without decoding.

    No request deserializer: the body, if it is read at all, stays raw bytes. An unknown method gets a
    streaming handler, which reads nothing, so that probing for methods without a token learns nothing.
    """

    async def deny(_request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(
            grpc.StatusCode.UNAUTHENTICATED, f"{message}: send 'authorization: Bearer <token>'"
        )

    if handler is not None and handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(deny)
    if handler is not None and handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(deny)
    if handler is not None and handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(deny)
    return grpc.stream_stream_rpc_method_handler(deny)
