"""Options every `sdxl` command shares (target, auth, TLS, deadline) and the clients built from them.

Each option also reads an environment variable, so that a shell or a Kubernetes Job sets it once:
SDXL_TARGET, SDXL_TOKEN, SDXL_TOKEN_FILE, SDXL_TLS, SDXL_CA_CERT, SDXL_TLS_SERVER_NAME.
"""

from __future__ import annotations

import argparse
import os
import pathlib
from typing import TypedDict

from sdxl_client._channel import DEFAULT_TARGET
from sdxl_client._retry import RetryPolicy
from sdxl_client.aio import AsyncClient
from sdxl_client.client import Client


def add_connection_options(parser: argparse.ArgumentParser, *, default_retries: int = 4) -> None:
    """Adds --target, --token, --token-file, --tls, --ca-cert, --tls-server-name and --timeout."""
    group = parser.add_argument_group("connection")
    group.add_argument(
        "--target",
        default=os.environ.get("SDXL_TARGET", DEFAULT_TARGET),
        help="server address: host:port, dns:///host:port (balances over all addresses) or "
        "ipv4:h1:p1,h2:p2 (env SDXL_TARGET, default %(default)s)",
    )
    group.add_argument("--token", default=os.environ.get("SDXL_TOKEN"), help="bearer token (env SDXL_TOKEN)")
    group.add_argument(
        "--token-file",
        type=pathlib.Path,
        default=os.environ.get("SDXL_TOKEN_FILE"),
        help="file holding the bearer token (env SDXL_TOKEN_FILE)",
    )
    group.add_argument(
        "--tls",
        action=argparse.BooleanOptionalAction,
        default=os.environ.get("SDXL_TLS", "").lower() in ("1", "true", "yes"),
        help="connect with TLS (env SDXL_TLS)",
    )
    group.add_argument(
        "--ca-cert",
        type=pathlib.Path,
        default=os.environ.get("SDXL_CA_CERT"),
        help="PEM root certificates to verify the server (implies --tls; env SDXL_CA_CERT)",
    )
    group.add_argument(
        "--tls-server-name",
        default=os.environ.get("SDXL_TLS_SERVER_NAME"),
        help="name to verify the server certificate against (env SDXL_TLS_SERVER_NAME)",
    )
    group.add_argument(
        "--timeout", type=float, default=300.0, help="deadline of a call in seconds (default %(default)s)"
    )
    group.add_argument(
        "--retries",
        type=int,
        default=default_retries,
        help="retries of UNAVAILABLE/RESOURCE_EXHAUSTED within the deadline (default %(default)s)",
    )


class _ClientOptions(TypedDict):
    token: str | None
    tls: bool
    root_certificates: bytes | None
    tls_server_name: str | None
    timeout: float | None
    retry: RetryPolicy


def _client_kwargs(args: argparse.Namespace) -> _ClientOptions:
    token = args.token
    if token is None and args.token_file is not None:
        token = pathlib.Path(args.token_file).read_text().strip()
    root_certificates = pathlib.Path(args.ca_cert).read_bytes() if args.ca_cert else None
    return _ClientOptions(
        token=token,
        tls=bool(args.tls or root_certificates),
        root_certificates=root_certificates,
        tls_server_name=args.tls_server_name,
        timeout=args.timeout,
        retry=RetryPolicy(max_attempts=1 + max(0, args.retries)),
    )


def make_client(args: argparse.Namespace) -> Client:
    """A sync client configured from the parsed connection options."""
    return Client(args.target, **_client_kwargs(args))


def make_async_client(args: argparse.Namespace) -> AsyncClient:
    """An asyncio client configured from the parsed connection options."""
    return AsyncClient(args.target, **_client_kwargs(args))
