"""gRPC channels as both clients open them: balancing, keepalive, message sizes, TLS and the token.

Balancing is client-side ``round_robin`` (set through the service config), so a target that resolves to
several addresses spreads calls over all of them and skips the ones that fail: ``dns:///name:port`` for a
Kubernetes headless Service (one A record per ready pod), or ``ipv4:10.0.0.1:50051,10.0.0.2:50051`` for
an explicit list. With a plain ClusterIP Service there is a single address and kube-proxy balances per
connection instead; the server ages connections so that clients re-resolve.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import metadata

import grpc
import grpc.aio

DEFAULT_TARGET = "localhost:50051"


def _client_version() -> str:
    try:
        return metadata.version("sdxl-client")
    except metadata.PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class ChannelSettings:
    """How to reach the server.

    Attributes:
        target: A gRPC target: ``host:port``, ``dns:///host:port`` or ``ipv4:a:p,b:p``.
        tls: Use TLS (server authentication).
        root_certificates: PEM roots to verify the server with; None uses the system roots.
        tls_server_name: Name to verify the server's certificate against, when it differs from the target.
        token: Bearer token sent as ``authorization: Bearer <token>`` on every call.
        keepalive_seconds: Interval of HTTP/2 pings while calls are active, to notice a dead server
            whose connection never closes. The default, 300 s, is the least a gRPC server accepts
            unless it lowers ``grpc.http2.min_recv_ping_interval_without_data_ms``; pinging more often
            than the server allows gets the connection closed (GOAWAY "too_many_pings").
        keepalive_timeout_seconds: How long a ping may go unanswered before the connection is dropped.
        max_message_bytes: Largest response accepted (several large PNGs can exceed gRPC's 4 MiB default).
        load_balancing: gRPC load-balancing policy name: ``round_robin`` or ``pick_first``.
    """

    target: str = DEFAULT_TARGET
    tls: bool = False
    root_certificates: bytes | None = None
    tls_server_name: str | None = None
    token: str | None = None
    keepalive_seconds: float = 300.0
    keepalive_timeout_seconds: float = 20.0
    max_message_bytes: int = 256 * 1024 * 1024
    load_balancing: str = "round_robin"

    def options(self) -> list[tuple[str, str | int]]:
        """The gRPC channel arguments these settings stand for."""
        options: list[tuple[str, str | int]] = [
            ("grpc.service_config", json.dumps({"loadBalancingConfig": [{self.load_balancing: {}}]})),
            ("grpc.keepalive_time_ms", int(self.keepalive_seconds * 1000)),
            ("grpc.keepalive_timeout_ms", int(self.keepalive_timeout_seconds * 1000)),
            ("grpc.keepalive_permit_without_calls", 0),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.primary_user_agent", f"sdxl-client/{_client_version()}"),
        ]
        if self.tls_server_name:
            options.append(("grpc.ssl_target_name_override", self.tls_server_name))
        return options

    def call_metadata(self) -> tuple[tuple[str, str], ...]:
        """Metadata added to every call: the token on plaintext channels (TLS sends it as credentials)."""
        if self.token and not self.tls:
            return (("authorization", f"Bearer {self.token}"),)
        return ()

    def _credentials(self) -> grpc.ChannelCredentials:
        credentials = grpc.ssl_channel_credentials(root_certificates=self.root_certificates)
        if self.token:
            credentials = grpc.composite_channel_credentials(
                credentials, grpc.access_token_call_credentials(self.token)
            )
        return credentials


def open_channel(settings: ChannelSettings) -> grpc.Channel:
    """Opens a synchronous channel (connections are made lazily, on the first call)."""
    if settings.tls:
        return grpc.secure_channel(settings.target, settings._credentials(), options=settings.options())
    return grpc.insecure_channel(settings.target, options=settings.options())


def open_aio_channel(settings: ChannelSettings) -> grpc.aio.Channel:
    """Opens an asyncio channel (connections are made lazily, on the first call)."""
    if settings.tls:
        return grpc.aio.secure_channel(settings.target, settings._credentials(), options=settings.options())
    return grpc.aio.insecure_channel(settings.target, options=settings.options())
