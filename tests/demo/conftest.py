"""One real ``sdxl-server serve --model demo`` on 127.0.0.1 for the demo model's tests.

Started by the test-support package's server helper (``sdxl_test_support.servers``: free ports, the
listening line, readiness through the gRPC health service). SDXL_TEST_DEMO_MODEL (a model directory)
replaces ``demo`` when set, to judge a model being trained before it is shipped
(tools/train_demo_model.py); normally unset.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterator

import pytest
from sdxl_test_support.servers import RunningServer

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


@pytest.fixture(scope="session")
def demo_server(compilation_cache_dir: pathlib.Path) -> Iterator[str]:
    """The gRPC target of a running demo-model server."""
    model = os.environ.get("SDXL_TEST_DEMO_MODEL") or "demo"
    server = RunningServer(["--model", model, *SERVER_ARGS])
    try:
        server.wait_ready()
        yield server.target
    finally:
        server.kill()
