"""What gRPC core does with calls that wait for a busy Python server to ask for them.

A gRPC server's core accepts calls on its own threads and holds each until the Python server requests
the next one; a call that has waited ``grpc.server_max_unrequested_time_in_server`` (default 30 s) is
cancelled: the caller gets CANCELLED with no details, and the server's handlers, metrics and logs never
see it. In the fleet harness a 0.3-CPU pod under a retry storm reached that (docs/AUTOSCALING.md). This
reproduces it in seconds: a plain gRPC health server whose event loop is blocked while a few calls
arrive, once with the limit shortened to 1 s and once with the server's own options (600 s), which
keep the calls to be answered once the loop runs again.

    .venv/bin/python -m fleet.unrequested_calls [--block-seconds 4]
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
from collections import Counter

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from sdxl_server.service.grpc_server import ServerOptions, server_options

LIMIT_OPTION = "grpc.server_max_unrequested_time_in_server"


async def _outcomes(options: list[tuple[str, int]], calls: int, block_seconds: float) -> Counter[str]:
    server = grpc.aio.server(options=options)
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    outcomes: Counter[str] = Counter()
    blocked = threading.Event()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    stub = health_pb2_grpc.HealthStub(channel)
    # Connected before the loop blocks (from a thread: this one runs the server's loop).
    await asyncio.to_thread(stub.Check, health_pb2.HealthCheckRequest(), timeout=30)

    def call() -> None:
        blocked.wait()
        try:
            stub.Check(health_pb2.HealthCheckRequest(), timeout=60)
            outcomes["OK"] += 1
        except grpc.RpcError as error:
            outcomes[f"{error.code().name}: {error.details()}"] += 1

    threads = [threading.Thread(target=call) for _ in range(calls)]
    for thread in threads:
        thread.start()
    blocked.set()
    time.sleep(block_seconds)  # the event loop is blocked, as a starved one is: nobody requests calls
    await asyncio.to_thread(lambda: [thread.join() for thread in threads])
    channel.close()
    await server.stop(0)
    return outcomes


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=6)
    parser.add_argument("--block-seconds", type=float, default=4.0)
    args = parser.parse_args()
    ours = server_options(ServerOptions("127.0.0.1", 0, max_connection_age_seconds=30))
    shortened = [(k, v) for k, v in ours if k != LIMIT_OPTION] + [(LIMIT_OPTION, 1)]
    for name, options in (
        ("limit 1 s", shortened),
        (f"the server's options ({dict(ours)[LIMIT_OPTION]} s)", ours),
    ):
        outcomes = asyncio.run(_outcomes(options, args.calls, args.block_seconds))
        print(f"{name}, loop blocked {args.block_seconds} s, {args.calls} calls: {dict(outcomes)}")


if __name__ == "__main__":
    main()
