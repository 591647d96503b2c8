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

# The chart's CPU example's engine (helm/sdxl-serve/examples/cpu.yaml: 64x64, 2 slots, the default
# --max-steps), so that whichever of this server and tests/chart's starts second loads the other's
# programs from the compilation cache. The tests send ~100 images at once: 2 slots keep both cores busy.
SERVER_ARGS = (
    "--host", "127.0.0.1",
    "--port", "0",
    "--metrics-port", "0",
    "--resolutions", "64x64",
    "--slots-per-device", "2",
    "--max-queue", "256",
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
