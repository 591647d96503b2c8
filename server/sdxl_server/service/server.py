"""Builds the grpc.aio server: image service, health, reflection, optional TLS and bearer-token auth.

``build_server`` returns ``(server, port)`` with the port bound (0 picks a free one) but not started, and
the health service NOT_SERVING for every name: the caller flips it to SERVING once warm-up is done.
Connections are aged (``grpc.max_connection_age_ms``) so that long-lived clients reconnect, re-resolve
and spread onto replicas added by a scale-up; the age grace lets RPCs in flight on an aged connection end.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from sdxl_client._proto.sdxl.v1 import sdxl_pb2, sdxl_pb2_grpc

from sdxl_server.service.auth import BearerTokenInterceptor

IMAGE_SERVICE = sdxl_pb2.DESCRIPTOR.services_by_name["ImageService"].full_name
# Health names: "" is the whole server (what Kubernetes probes ask by default), then the image service.
HEALTH_NAMES = ("", IMAGE_SERVICE)
# An accepted request must be able to finish on an aged connection; 10 minutes covers a full queue
# of 1024x1024 SDXL requests on one v5e chip.
CONNECTION_AGE_GRACE_SECONDS = 600


@dataclasses.dataclass(frozen=True)
class ServerOptions:
    host: str
    port: int
    max_connection_age_seconds: float
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    auth_token: str | None = None
    # Told the method of every call rejected for a missing or wrong token (for metrics).
    on_auth_reject: Callable[[str], None] | None = None


class BindError(RuntimeError):
    pass


def build_server(
    servicer: sdxl_pb2_grpc.ImageServiceServicer, health: health_aio.HealthServicer, options: ServerOptions
) -> tuple[grpc.aio.Server, int]:
    interceptors = []
    if options.auth_token is not None:
        interceptors.append(BearerTokenInterceptor(options.auth_token, options.on_auth_reject))
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_connection_age_ms", int(options.max_connection_age_seconds * 1000)),
            ("grpc.max_connection_age_grace_ms", CONNECTION_AGE_GRACE_SECONDS * 1000),
            # Without this a second server could silently share a fixed port with a running one.
            ("grpc.so_reuseport", 0),
        ],
    )
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
