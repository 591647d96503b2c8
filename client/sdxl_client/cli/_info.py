"""`sdxl info` (what the server serves) and `sdxl health` (is it serving)."""

from __future__ import annotations

import argparse
import json

from sdxl_client._errors import DeadlineExceeded
from sdxl_client._types import HealthStatus
from sdxl_client.cli._connection import make_client, wait_while_warming_up


def add_parsers(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> list[argparse.ArgumentParser]:
    info = subparsers.add_parser("info", help="describe the served model and request bounds")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(run=run_info)
    health = subparsers.add_parser(
        "health", help="check the gRPC health service; exit status 0 only when SERVING"
    )
    health.add_argument("--service", default="", help="service name to check (default: the whole server)")
    health.add_argument(
        "--wait", type=float, default=0.0, metavar="SECONDS", help="poll until SERVING, at most this long"
    )
    health.set_defaults(run=run_health)
    return [info, health]


def run_info(args: argparse.Namespace) -> int:
    with make_client(args) as client:
        wait_while_warming_up(client, args)
        info = client.server_info()
    data = info.as_dict()
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    versions = data.pop("versions")
    for key, value in data.items():
        shown = ", ".join(map(str, value)) if isinstance(value, list) else value
        print(f"{key:<24}{shown}")
    for name, version in sorted(versions.items()):
        print(f"{'version ' + name:<24}{version}")
    return 0


def run_health(args: argparse.Namespace) -> int:
    with make_client(args) as client:
        if args.wait > 0:
            try:
                client.wait_until_serving(args.wait)
            except DeadlineExceeded as error:
                print(error.message)
                return 1
        status = client.health(service=args.service)
    print(status.name)
    return 0 if status is HealthStatus.SERVING else 1
