"""Real ``sdxl-server serve`` processes with the HTTP front door on (``--http-port 0``).

The processes are started by the integration tests' own machinery (``RunningServer``: free ports, the
listening line, readiness through the gRPC health service, killed at teardown), loaded from
tests/integration/conftest.py by path: pytest imports every directory's conftest as a module named
``conftest``, so ``import conftest`` could pick another directory's.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys
from collections.abc import Callable, Iterator

import pytest

_INTEGRATION = pathlib.Path(__file__).resolve().parents[1] / "integration"
_spec = importlib.util.spec_from_file_location("integration_servers", _INTEGRATION / "conftest.py")
assert _spec is not None and _spec.loader is not None
servers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(servers)
sys.path.insert(0, str(_INTEGRATION))  # service_helpers (metrics parsing), shared with the gRPC tests

RunningServer = servers.RunningServer
StartServer = Callable[..., RunningServer]


@pytest.fixture(scope="module")
def http_server_factory(
    tiny_model_dir: pathlib.Path, compilation_cache_dir: pathlib.Path
) -> Iterator[StartServer]:
    """``start(*extra_args, env=None, wait_ready=True)``: the integration defaults plus ``--http-port 0``."""
    started: list[RunningServer] = []

    def start(*extra_args: str, env: dict[str, str] | None = None, wait_ready: bool = True) -> RunningServer:
        server = RunningServer([*servers.DEFAULT_ARGS, "--http-port", "0", *extra_args], env)
        started.append(server)
        if wait_ready:
            server.wait_ready()
        return server

    try:
        yield start
    finally:
        for server in started:
            server.kill()
