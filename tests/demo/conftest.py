"""One real ``sdxl-server serve --model demo`` on 127.0.0.1 for the demo model's tests.

The server binds free ports and logs a JSON "listening" line; readiness is observed through the gRPC
health service's Watch stream. SDXL_TEST_DEMO_MODEL (a model directory) replaces ``demo`` when set, to
judge a model being trained before it is shipped (tools/train_demo_model.py); normally unset.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import threading
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

READY_TIMEOUT_SECONDS = 600
# 4 slots: the tests send ~100 images at once, and batches of 4 keep the CPU busy; each slot-count
# bucket (1, 2, 4) is a program to compile, so more slots would cost warm-up time.
SERVER_ARGS = (
    "--host", "127.0.0.1",
    "--port", "0",
    "--metrics-port", "0",
    "--resolutions", "64x64",
    "--slots-per-device", "4",
    "--max-queue", "256",
    "--max-steps", "20",
    "--default-steps", "10",
)  # fmt: skip


def _wait_until_serving(target: str, process: subprocess.Popen[str]) -> None:
    with grpc.insecure_channel(target) as channel:
        stream = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=""), timeout=READY_TIMEOUT_SECONDS
        )
        for response in stream:
            if response.status == health_pb2.HealthCheckResponse.SERVING:
                stream.cancel()
                return
    pytest.fail(f"the demo server never reported SERVING (exit code {process.poll()})")


@pytest.fixture(scope="session")
def demo_server(compilation_cache_dir: pathlib.Path) -> Iterator[str]:
    """The gRPC target of a running demo-model server."""
    model = os.environ.get("SDXL_TEST_DEMO_MODEL") or "demo"
    process = subprocess.Popen(
        [sys.executable, "-m", "sdxl_server.main", "serve", "--model", model, *SERVER_ARGS],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    port = None
    seen = []
    for line in process.stdout:
        seen.append(line)
        if line.startswith("{") and json.loads(line).get("event") == "listening":
            port = json.loads(line)["port"]
            break
    try:
        if port is None:
            pytest.fail(f"demo server exited with {process.wait()} before listening:\n{''.join(seen)}")
        # Keep draining the logs so that the server never blocks on a full pipe.
        threading.Thread(target=process.stdout.read, daemon=True).start()
        target = f"127.0.0.1:{port}"
        _wait_until_serving(target, process)
        yield target
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
