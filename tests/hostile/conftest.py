"""Real servers for the hostile-input suite, started the way tests/integration starts them.

The server machinery lives in tests/integration/conftest.py; it is loaded here under its own module name
(a plain ``import conftest`` could pick up this directory's conftest instead), and tests/integration is
put on sys.path for ``service_helpers``.

``hostile_server`` (session scope): one server with a bearer token (a Kubernetes-style mounted Secret:
``token`` is a symlink into a ``..data`` directory that a rotation swaps atomically), small step and
image limits so that fuzzed requests that happen to be valid cost little device time.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hostile_wire import TOKEN

_INTEGRATION = Path(__file__).resolve().parents[1] / "integration"
if str(_INTEGRATION) not in sys.path:
    sys.path.insert(0, str(_INTEGRATION))
_spec = importlib.util.spec_from_file_location("integration_servers", _INTEGRATION / "conftest.py")
assert _spec is not None and _spec.loader is not None
servers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(servers)

HOSTILE_ARGS = ("--max-steps", "3", "--default-steps", "2", "--max-images-per-request", "2")


class MountedSecret:
    """A token file laid out as the kubelet mounts a Secret key, rotated as the kubelet rotates it."""

    def __init__(self, directory: Path, token: str) -> None:
        self.directory = directory
        self._generation = 0
        self.write(token)
        (directory / "token").symlink_to("..data/token")

    @property
    def path(self) -> Path:
        return self.directory / "token"

    def write(self, content: str) -> None:
        """Writes a new timestamped directory and swaps ``..data`` to it in one rename."""
        self._generation += 1
        generation = self.directory / f"..gen{self._generation}"
        generation.mkdir()
        (generation / "token").write_text(content)
        link = self.directory / "..data_tmp"
        link.symlink_to(generation.name)
        os.replace(link, self.directory / "..data")


@pytest.fixture(scope="session")
def secret(tmp_path_factory) -> MountedSecret:
    return MountedSecret(tmp_path_factory.mktemp("secret"), TOKEN)


@pytest.fixture(scope="session")
def hostile_server(tiny_model_dir, compilation_cache_dir, secret) -> Iterator[object]:
    server = servers.RunningServer(
        [*servers.DEFAULT_ARGS, *HOSTILE_ARGS, "--auth-token-file", str(secret.path)]
    )
    try:
        server.wait_ready()
        yield server
    finally:
        server.kill()


@pytest.fixture
def server_factory(tiny_model_dir, compilation_cache_dir):
    """``start(*extra_args, env=None, wait_ready=True)``, as in tests/integration."""
    with servers._servers() as start:
        yield start


@pytest.fixture(scope="module")
def fresh_server(tiny_model_dir, compilation_cache_dir):
    """A server with the default arguments, started for the module that asks (it has served nothing)."""
    with servers._servers() as start:
        yield start()
