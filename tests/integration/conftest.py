"""Real ``sdxl-server serve`` processes on 127.0.0.1 for the integration tests.

The processes themselves (free ports, the listening line, readiness through the gRPC health service) are
the test-support package's (``sdxl_test_support.servers``), shared with tests/http, tests/hostile,
tests/monitoring and the benchmarks.

Fixtures:
- ``server_factory`` (function scope): ``start(*extra_args, env=None, wait_ready=True) -> RunningServer``.
- ``module_server_factory`` (module scope): the same, for servers shared by the tests of one module.
- ``shared_server`` (session scope): one server with the default arguments, for tests that need no flags.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sdxl_test_support.servers import RunningServer, StartServer, started_servers


@pytest.fixture
def server_factory(tiny_model_dir: Path, compilation_cache_dir: Path) -> Iterator[StartServer]:
    """``start(*extra_args, env=None, wait_ready=True)``; later flags override the defaults."""
    with started_servers() as start:
        yield start


@pytest.fixture(scope="session")
def shared_server(tiny_model_dir: Path, compilation_cache_dir: Path) -> Iterator[RunningServer]:
    with started_servers() as start:
        yield start()


@pytest.fixture(scope="module")
def module_server_factory(tiny_model_dir: Path, compilation_cache_dir: Path) -> Iterator[StartServer]:
    """Like ``server_factory``, for servers with special flags shared by the tests of one module."""
    with started_servers() as start:
        yield start
