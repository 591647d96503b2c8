"""The `helm test` hook's health check, run here against a real gRPC health service on 127.0.0.1.

The hook runs the server image's Python with an inline script (templates/tests/test-grpc-health.yaml);
this runs the rendered script and arguments with this machine's Python, only the target swapped for a local
server, so that a broken script fails here rather than in a cluster.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from sdxl_test_support.chart_render import is_helm_test, render_value_set

HealthServer = tuple[str, health.HealthServicer]


@pytest.fixture
def health_server() -> Iterator[HealthServer]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        server.stop(grace=None)


def _hook_command() -> list[str]:
    test_pod = next(m for m in render_value_set("defaults") if is_helm_test(m))
    container = test_pod["spec"]["containers"][0]
    assert container["command"] == ["python", "-c"]
    script, _target = container["args"]
    return [sys.executable, "-c", script]


def test_hook_passes_when_the_image_service_is_serving(
    health_server: tuple[str, health.HealthServicer],
) -> None:
    target, servicer = health_server
    servicer.set("sdxl.v1.ImageService", health_pb2.HealthCheckResponse.SERVING)
    result = subprocess.run(
        [*_hook_command(), target], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{target}: SERVING"
