"""Options every `sdxl` command shares (target, auth, TLS, deadline) and the clients built from them.

Each option also reads an environment variable, so that a shell or a Kubernetes Job sets it once:
SDXL_TARGET, SDXL_TOKEN, SDXL_TOKEN_FILE, SDXL_TLS, SDXL_CA_CERT, SDXL_TLS_SERVER_NAME.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
from typing import TypedDict

from sdxl_client._base import RetryHook
from sdxl_client._channel import DEFAULT_TARGET, TargetError, parse_target
from sdxl_client._errors import SdxlError
from sdxl_client._retry import RetryPolicy
from sdxl_client._types import HealthStatus
from sdxl_client.aio import AsyncClient
from sdxl_client.cli._messages import retry_note
from sdxl_client.cli._terminal import StatusLine
from sdxl_client.client import Client


def add_connection_options(parser: argparse.ArgumentParser, *, default_retries: int = 4) -> None:
    """Adds --target, --token, --token-file, --tls, --ca-cert, --tls-server-name and --timeout."""
    group = parser.add_argument_group("connection")
    group.add_argument(
        "--target",
        default=os.environ.get("SDXL_TARGET", DEFAULT_TARGET),
        help="server address: host[:port] (port 50051 when left out), http(s)://host:port, "
        "dns:///host:port (balances over all addresses) or ipv4:h1:p1,h2:p2 "
        "(env SDXL_TARGET, default %(default)s)",
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


def _retry_printer(args: argparse.Namespace, line: StatusLine | None) -> RetryHook:
    """Says on stderr that a call is retried, and why, instead of waiting silently."""
    notes = line if line is not None else StatusLine(enabled=False)
    try:
        target = parse_target(args.target)[0]
    except TargetError:
        target = args.target  # the client refuses it on construction, with the reason
    max_attempts = 1 + max(0, args.retries)

    def on_retry(error: SdxlError, failed_attempt: int, delay: float) -> None:
        notes.note(retry_note(error, failed_attempt, max_attempts, delay, target))

    return on_retry


def make_client(args: argparse.Namespace, line: StatusLine | None = None) -> Client:
    """A sync client configured from the parsed connection options; retries are noted on ``line``."""
    return Client(args.target, on_retry=_retry_printer(args, line), **_client_kwargs(args))


def make_async_client(args: argparse.Namespace, line: StatusLine | None = None) -> AsyncClient:
    """An asyncio client configured from the parsed connection options; retries are noted on ``line``."""
    return AsyncClient(args.target, on_retry=_retry_printer(args, line), **_client_kwargs(args))


# How long the first health check may take: a server that does not answer in this time is reported by
# the call that follows (with its retries), not waited for.
_FIRST_CHECK_SECONDS = 5.0


def _waiting_note(args: argparse.Namespace, status: HealthStatus) -> str:
    return (
        f"waiting for the server at {args.target} to finish warming up (health: {status.name}); "
        f"up to {args.timeout:g} s (--timeout), Ctrl-C stops"
    )


def wait_while_warming_up(client: Client, args: argparse.Namespace) -> None:
    """A server that answers but is not SERVING yet (warming up: compiling, loading the model) is watched
    through its health service up to ``--timeout``, saying so once on stderr, instead of being retried a
    few times and given up on.

    Raises:
        DeadlineExceeded: Still not SERVING after ``--timeout`` seconds.
    """
    try:
        status = client.health(timeout=min(args.timeout, _FIRST_CHECK_SECONDS))
    except SdxlError:
        return  # nobody answers: the call that follows says so
    if status is HealthStatus.SERVING:
        return
    print(_waiting_note(args, status), file=sys.stderr, flush=True)
    client.wait_until_serving(args.timeout)


async def wait_while_warming_up_async(client: AsyncClient, args: argparse.Namespace) -> None:
    """:func:`wait_while_warming_up` for the asyncio client."""
    try:
        status = await client.health(timeout=min(args.timeout, _FIRST_CHECK_SECONDS))
    except SdxlError:
        return
    if status is HealthStatus.SERVING:
        return
    print(_waiting_note(args, status), file=sys.stderr, flush=True)
    await client.wait_until_serving(args.timeout)
