"""How long a gRPC channel on a ``dns://`` target takes to use a newly published address.

Two plain gRPC health servers on 127.0.0.20 and 127.0.0.21 (no model: this measures the client's
resolver, not the server), dnsmasq publishing first one address, then both; a channel with
``round_robin`` keeps calling and the time until the second server's first call is printed, for
servers that age connections after the given ages (0 = never). gRPC re-resolves only when a connection
closes, and at most every ``grpc.dns_min_time_between_resolutions_ms`` (30 s by default; sdxl_client's
channels set 1 s, and ``--client-settings`` opens the channel as they do).

    .venv/bin/python -m fleet.reresolution [--ages 0,5,60] [--wait 40] [--client-settings]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from sdxl_client._channel import ChannelSettings

from fleet.dns import Dns
from fleet.ports import free_port

ADDRESSES = ("127.0.0.20", "127.0.0.21")


class _CountingHealth(health_aio.HealthServicer):
    def __init__(self, name: str, hits: Counter[str]) -> None:
        super().__init__()
        self._name = name
        self._hits = hits

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: object
    ) -> health_pb2.HealthCheckResponse:
        self._hits[self._name] += 1
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


async def measure(
    dnsmasq: str,
    age_seconds: float,
    wait: float,
    port: int,
    channel_options: list[tuple[str, str | int]] | None = None,
) -> float | None:
    """Seconds until a channel with `channel_options` (default: plain round_robin) first calls the
    address published second; None if not within `wait`."""
    hits: Counter[str] = Counter()
    servers = []
    for address in ADDRESSES:
        options = [("grpc.max_connection_age_ms", int(age_seconds * 1000))] if age_seconds else []
        server = grpc.aio.server(options=options)
        health_pb2_grpc.add_HealthServicer_to_server(_CountingHealth(address, hits), server)
        server.add_insecure_port(f"{address}:{port}")
        await server.start()
        servers.append(server)
    dns = Dns(dnsmasq, Path(tempfile.mkdtemp(prefix="sdxl-reresolve-")), "probe.fleet.svc.cluster.local")
    await dns.start()
    try:
        dns.set_addresses([ADDRESSES[0]])
        await asyncio.sleep(0.5)  # dnsmasq re-reads its hosts file on SIGHUP, asynchronously
        if channel_options is None:
            channel_options = [("grpc.service_config", '{"loadBalancingConfig": [{"round_robin": {}}]}')]
        async with grpc.aio.insecure_channel(dns.target(port), options=channel_options) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for _ in range(20):
                await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
            dns.set_addresses(list(ADDRESSES))
            start = time.monotonic()
            while time.monotonic() - start < wait:
                await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
                if hits[ADDRESSES[1]]:
                    return time.monotonic() - start
                await asyncio.sleep(0.05)
            return None
    finally:
        await dns.stop()
        for server in servers:
            await server.stop(0)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ages", default="0,5,60", help="server connection ages in seconds (0 = none)")
    parser.add_argument("--wait", type=float, default=40.0, help="seconds to wait for the new address")
    parser.add_argument(
        "--client-settings",
        action="store_true",
        help="open the channel as sdxl_client does (ChannelSettings), not with gRPC's defaults",
    )
    args = parser.parse_args()
    dnsmasq = os.environ.get("SDXL_DNSMASQ") or str(
        Path(__file__).resolve().parents[1] / ".tools/debian/bin/dnsmasq"
    )
    options = ChannelSettings().options() if args.client_settings else None
    for age in (float(a) for a in args.ages.split(",")):
        seconds = asyncio.run(measure(dnsmasq, age, args.wait, free_port(), options))
        shown = f"{seconds:.1f} s" if seconds is not None else f"not within {args.wait:.0f} s"
        print(f"connection age {age:g} s: a new address got its first call after {shown}")


if __name__ == "__main__":
    main()
