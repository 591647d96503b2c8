"""Builds the grpc.aio server: image service, health, reflection, optional TLS and bearer-token auth.

``build_server`` returns ``(server, port)`` with the port bound (0 picks a free one) but not started, and
the health service NOT_SERVING for every name: the caller flips it to SERVING once warm-up is done.
Connections are aged (``grpc.max_connection_age_ms``) so that long-lived clients reconnect, re-resolve
and spread onto replicas added by a scale-up; the age grace lets RPCs in flight on an aged connection end.

What a caller can send, and what it gets (docs/HARDENING.md has the full table): interceptors run in
order before anything is decoded, first the token check (UNAUTHENTICATED, body never read), then the
decode guard (a body that is not a valid message is INVALID_ARGUMENT). A body over
``MAX_REQUEST_BYTES`` is refused by grpc itself with RESOURCE_EXHAUSTED ("Received message larger than
max"), without RetryInfo, which clients must not retry. Keepalive: the server pings every connection to
find dead peers (their requests are cancelled and free their slots), and allows client pings far more
often than the client library sends them, so no connection is closed for "too many pings".
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from collections.abc import Awaitable, Callable

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from sdxl_client._proto.sdxl.v1 import sdxl_pb2, sdxl_pb2_grpc

from sdxl_server.service.auth import BearerTokenInterceptor, TokenFile
from sdxl_server.service.decode_guard import DecodeGuardInterceptor

IMAGE_SERVICE = sdxl_pb2.DESCRIPTOR.services_by_name["ImageService"].full_name
# Health names: "" is the whole server (what Kubernetes probes ask by default), then the image service.
HEALTH_NAMES = ("", IMAGE_SERVICE)
# An accepted request must be able to finish on an aged connection; 10 minutes covers a full queue
# of 1024x1024 SDXL requests on one v5e chip.
CONNECTION_AGE_GRACE_SECONDS = 600
# gRPC core holds a call that has arrived until the server asks for the next one, and cancels it once it
# has waited this long (default 30 s), with a bare CANCELLED that no client retries and that no handler,
# metric or log of ours ever sees. A server whose event loop is starved (measured: a 0.3-CPU pod under a
# retry storm, docs/AUTOSCALING.md) reaches that; a call that reached the server should instead get the
# server's answer (served, refused with a retry delay, or expired at its deadline). Bounded by count
# anyway: past 1,000 waiting calls gRPC refuses new ones with RESOURCE_EXHAUSTED.
MAX_UNREQUESTED_SECONDS = CONNECTION_AGE_GRACE_SECONDS
# The largest request is two 16,384-character prompts of 4-byte UTF-8 (128 KiB) plus small fields.
MAX_REQUEST_BYTES = 1 << 20
# Server pings: often enough to notice a vanished client within a couple of minutes (its queued and
# running images are then cancelled), rarely enough to cost nothing.
KEEPALIVE_SECONDS = 60
KEEPALIVE_TIMEOUT_SECONDS = 20
# Client pings accepted this often without data; the client library pings every 300 s during calls
# (sdxl_client ChannelSettings.keepalive_seconds), 5x slower than this allows. gRPC's default, 300 s,
# would leave the client exactly at the limit.
MIN_CLIENT_PING_INTERVAL_SECONDS = 60


@dataclasses.dataclass(frozen=True)
class ServerOptions:
    host: str
    port: int
    max_connection_age_seconds: float
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    # The accepted bearer tokens (re-read when the file changes); None turns auth off.
    auth_tokens: TokenFile | None = None
    # Told (method, status) of every call refused before its handler ran: a missing or wrong token,
    # an undecodable body. Methods are always ones the server has (for metrics labels).
    on_reject: Callable[[str, grpc.StatusCode], None] | None = None
    # Told of every call's arrival (for a quiet shutdown), before the token check.
    arrivals: CallArrivals | None = None


def server_options(options: ServerOptions) -> list[tuple[str, int]]:
    """The grpc core channel arguments of the server."""
    return [
        ("grpc.max_connection_age_ms", int(options.max_connection_age_seconds * 1000)),
        ("grpc.max_connection_age_grace_ms", CONNECTION_AGE_GRACE_SECONDS * 1000),
        ("grpc.server_max_unrequested_time_in_server", MAX_UNREQUESTED_SECONDS),
        # Without this a second server could silently share a fixed port with a running one.
        ("grpc.so_reuseport", 0),
        ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
        ("grpc.keepalive_time_ms", KEEPALIVE_SECONDS * 1000),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_SECONDS * 1000),
        # Idle connections are pinged too: a vanished peer's socket is closed instead of held open.
        ("grpc.keepalive_permit_without_calls", 1),
        # 0: the server's pings continue on a connection that carries no data (a long unary call).
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.min_ping_interval_without_data_ms", MIN_CLIENT_PING_INTERVAL_SECONDS * 1000),
        # Pings faster than allowed twice in a row close the connection (GOAWAY too_many_pings).
        ("grpc.http2.max_ping_strikes", 2),
    ]


class BindError(RuntimeError):
    pass


class CallArrivals(grpc.aio.ServerInterceptor):
    """Remembers when the last call arrived, so that a shutdown can wait for a quiet moment.

    Why: ``server.stop`` makes grpc drop the calls that reached the server but not yet a handler, and
    their callers get CANCELLED, which no client retries. While the server still runs, a late call gets
    a quick UNAVAILABLE with a retry delay instead (the drain answer), and its caller backs off; so the
    shutdown waits until no call has arrived for a short while (bounded) before it stops grpc.
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._clock = clock
        self._sleep = sleep
        self._last = -math.inf

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        self._last = self._clock()
        return await continuation(handler_call_details)

    async def wait_quiet(self, quiet_seconds: float, most_seconds: float) -> bool:
        """Waits until no call arrived for ``quiet_seconds``, at most ``most_seconds``; False on timeout."""
        give_up = self._clock() + most_seconds
        while True:
            now = self._clock()
            quiet_at = self._last + quiet_seconds
            if now >= quiet_at:
                return True
            if now >= give_up:
                return False
            await self._sleep(min(quiet_at, give_up) - now)


def build_server(
    servicer: sdxl_pb2_grpc.ImageServiceServicer, health: health_aio.HealthServicer, options: ServerOptions
) -> tuple[grpc.aio.Server, int]:
    on_reject = options.on_reject

    def rejected(code: grpc.StatusCode) -> Callable[[str], None] | None:
        return None if on_reject is None else lambda method: on_reject(method, code)

    # Order matters: the token is checked before the decode guard, so no unauthenticated body is decoded.
    interceptors: list[grpc.aio.ServerInterceptor] = [] if options.arrivals is None else [options.arrivals]
    if options.auth_tokens is not None:
        interceptors.append(
            BearerTokenInterceptor(options.auth_tokens, rejected(grpc.StatusCode.UNAUTHENTICATED))
        )
    interceptors.append(DecodeGuardInterceptor(rejected(grpc.StatusCode.INVALID_ARGUMENT)))
    server = grpc.aio.server(interceptors=interceptors, options=server_options(options))
    sdxl_pb2_grpc.add_ImageServiceServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (IMAGE_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    address = f"{options.host}:{options.port}"
    credentials = _tls_credentials(options)
    try:
        if credentials is not None:
            port = server.add_secure_port(address, credentials)
        else:
            port = server.add_insecure_port(address)
    except RuntimeError:  # grpc raises on a failed bind (older versions returned 0)
        port = 0
    if port == 0:
        raise BindError(f"cannot listen on {address} (in use or not a local address)")
    return server, port


def _tls_credentials(options: ServerOptions) -> grpc.ServerCredentials | None:
    if not (options.tls_cert_file and options.tls_key_file):
        return None
    with open(options.tls_key_file, "rb") as key, open(options.tls_cert_file, "rb") as cert:
        return grpc.ssl_server_credentials([(key.read(), cert.read())])


async def new_health_servicer() -> health_aio.HealthServicer:
    """A health servicer that answers NOT_SERVING for every name until ``set_serving``."""
    health = health_aio.HealthServicer()  # starts with "" SERVING
    for name in HEALTH_NAMES:
        await health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    return health


async def set_serving(health: health_aio.HealthServicer) -> None:
    for name in HEALTH_NAMES:
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
