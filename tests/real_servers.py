"""The integration tests' real server processes, for other test directories (tests/http, tests/monitoring).

``RunningServer`` and ``DEFAULT_ARGS`` live in tests/integration/conftest.py (free ports, the listening
line, readiness through the gRPC health service). They are loaded from there by path: pytest imports every
directory's conftest as a module named ``conftest``, so ``import conftest`` could pick another directory's.
This module is importable because pytest puts tests/ (the directory of the root conftest) on sys.path.
"""

from __future__ import annotations

import contextlib
import importlib.util
import pathlib
import sys
from collections.abc import Callable, Iterator

INTEGRATION = pathlib.Path(__file__).resolve().parent / "integration"
_spec = importlib.util.spec_from_file_location("integration_servers", INTEGRATION / "conftest.py")
assert _spec is not None and _spec.loader is not None
_servers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_servers)
if str(INTEGRATION) not in sys.path:
    sys.path.insert(0, str(INTEGRATION))  # service_helpers (metrics parsing), shared with the gRPC tests

RunningServer = _servers.RunningServer
DEFAULT_ARGS: tuple[str, ...] = _servers.DEFAULT_ARGS
StartServer = Callable[..., RunningServer]


@contextlib.contextmanager
def started_servers(*always: str) -> Iterator[StartServer]:
    """``start(*extra_args, env=None, wait_ready=True)``: DEFAULT_ARGS + ``always``; killed on exit."""
    started: list[RunningServer] = []

    def start(*extra_args: str, env: dict[str, str] | None = None, wait_ready: bool = True) -> RunningServer:
        server = RunningServer([*DEFAULT_ARGS, *always, *extra_args], env)
        started.append(server)
        if wait_ready:
            server.wait_ready()
        return server

    try:
        yield start
    finally:
        for server in started:
            server.kill()
