"""Real ``sdxl-server serve`` processes with the HTTP front door on (``--http-port 0``), started by the
test-support package's server helper (sdxl_test_support.servers), as the integration tests' are."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

import pytest
from sdxl_test_support.servers import StartServer, started_servers


@pytest.fixture(scope="module")
def http_server_factory(
    tiny_model_dir: pathlib.Path, compilation_cache_dir: pathlib.Path
) -> Iterator[StartServer]:
    """``start(*extra_args, env=None, wait_ready=True)``: the integration defaults plus ``--http-port 0``."""
    with started_servers("--http-port", "0") as start:
        yield start
