"""gRPC channels as both clients open them: balancing, keepalive, message sizes, TLS and the token.

Balancing is client-side ``round_robin`` (set through the service config), so a target that resolves to
several addresses spreads calls over all of them and skips the ones that fail: ``dns:///name:port`` for a
Kubernetes headless Service (one A record per ready pod), or ``ipv4:10.0.0.1:50051,10.0.0.2:50051`` for
an explicit list. With a plain ClusterIP Service there is a single address and kube-proxy balances per
connection instead; the server ages connections so that clients re-resolve.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import metadata

import grpc
import grpc.aio

DEFAULT_PORT = 50051
DEFAULT_TARGET = f"localhost:{DEFAULT_PORT}"

# gRPC's own schemes (``dns:``, ``ipv4:``, ``ipv6:``, ``unix:``, ...): the target is passed on as written,
# apart from a missing port in ``dns:`` targets, which gRPC would otherwise take as 443.
_GRPC_SCHEME = re.compile(r"^(dns|ipv4|ipv6|unix|unix-abstract|vsock|xds|google-c2p):", re.IGNORECASE)
_URL_SCHEME = re.compile(r"^(?P<scheme>[a-z][a-z0-9+.-]*)://(?P<rest>.*)$", re.IGNORECASE)


class TargetError(ValueError):
    """A target the clients cannot use; the message says what to write instead."""


def parse_target(target: str) -> tuple[str, bool]:
    """Turns what a person writes into a gRPC target, and says whether it asks for TLS.

    ``host`` and ``[v6]`` get port 50051 (gRPC alone would use 443); ``http://host:port`` is
    ``host:port`` and ``https://host:port`` the same with TLS; gRPC's own ``dns:``/``ipv4:``/...
    targets pass through (a ``dns:`` name without a port gets 50051 too).

    Raises:
        TargetError: The target is empty, has a path, or uses a URL scheme other than http/https.
    """
    text = target.strip()
    if not text:
        raise TargetError("the target is empty; use host:port, e.g. localhost:50051")
    if _GRPC_SCHEME.match(text):
        if text.lower().startswith("dns:"):
            return _dns_with_port(text), False
        return text, False
    tls = False
    url = _URL_SCHEME.match(text)
    if url:
        scheme = url.group("scheme").lower()
        if scheme not in ("http", "https", "grpc", "grpcs"):
            raise TargetError(
                f"target {target!r}: unknown scheme {scheme}://; use host:port, e.g. localhost:50051"
            )
        tls = scheme in ("https", "grpcs")
        text = url.group("rest")
        if "/" in text.rstrip("/"):
            raise TargetError(f"target {target!r}: a gRPC target has no path; use host:port")
        text = text.rstrip("/")
    return _with_port(text, target), tls


def _with_port(host_port: str, original: str) -> str:
    if host_port.startswith("["):  # [v6] or [v6]:port
        closing = host_port.find("]")
        if closing < 0:
            raise TargetError(f"target {original!r}: unclosed '[' in an IPv6 address")
        return host_port if host_port[closing + 1 :].startswith(":") else f"{host_port}:{DEFAULT_PORT}"
    if host_port.count(":") > 1:  # a bare IPv6 address: gRPC needs it bracketed to add a port
        return f"[{host_port}]:{DEFAULT_PORT}"
    host, sep, port = host_port.partition(":")
    if not host:
        raise TargetError(f"target {original!r} has no host; use host:port, e.g. localhost:50051")
    if not sep:
        return f"{host}:{DEFAULT_PORT}"
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise TargetError(f"target {original!r}: port {port!r} is not a number in 1..65535")
    return host_port


def _dns_with_port(target: str) -> str:
    # dns:[//authority/]host[:port]
    prefix, _, name = target.rpartition("/") if "//" in target else ("dns", ":", target[4:])
    if prefix == "dns":
        prefix = "dns:"
    else:
        prefix += "/"
    if name.startswith("[") or ":" in name:
        return target
    return f"{prefix}{name}:{DEFAULT_PORT}"


def _client_version() -> str:
    try:
        return metadata.version("sdxl-client")
    except metadata.PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class ChannelSettings:
    """How to reach the server.

    Attributes:
        target: A gRPC target: ``host:port``, ``dns:///host:port`` or ``ipv4:a:p,b:p``; ``host`` alone
            means port 50051 and ``http://``/``https://`` prefixes are accepted (see :func:`parse_target`).
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
        min_reresolution_seconds: Shortest time between two DNS resolutions of a ``dns:`` target. gRPC
            re-resolves when a connection closes (the server ages them), but by default at most every
            30 s, so a new replica behind a headless Service waited up to 30 s more for traffic (measured
            with ``python -m fleet.reresolution``: 30.1 s at a 5 s connection age; 5.3 s with 1 s).
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
    min_reresolution_seconds: float = 1.0

    def __post_init__(self) -> None:
        target, tls = parse_target(self.target)
        object.__setattr__(self, "target", target)  # frozen: settle the written form once
        if tls:
            object.__setattr__(self, "tls", True)

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
            ("grpc.dns_min_time_between_resolutions_ms", int(self.min_reresolution_seconds * 1000)),
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
