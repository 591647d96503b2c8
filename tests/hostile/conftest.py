"""Real servers for the hostile-input suite, started by the test-support package's server helper
(``sdxl_test_support.servers``), as tests/integration starts them.

``hostile_server`` (session scope): one server with a bearer token (a Kubernetes-style mounted Secret:
``token`` is a symlink into a ``..data`` directory that a rotation swaps atomically), small step and
image limits so that fuzzed requests that happen to be valid cost little device time.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hostile_wire import TOKEN
from sdxl_test_support.servers import DEFAULT_ARGS, RunningServer, StartServer, started_servers

# The defaults' --max-steps (the step programs' shapes depend on it): this server then loads every program
# the other servers of the suite compiled. Fuzzed requests stay cheap by the steps they draw (0..3).
HOSTILE_ARGS = ("--default-steps", "2", "--max-images-per-request", "2")


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
def hostile_server(tiny_model_dir, compilation_cache_dir, secret) -> Iterator[RunningServer]:
    server = RunningServer([*DEFAULT_ARGS, *HOSTILE_ARGS, "--auth-token-file", str(secret.path)])
    try:
        server.wait_ready()
        yield server
    finally:
        server.kill()


@pytest.fixture
def server_factory(tiny_model_dir, compilation_cache_dir) -> Iterator[StartServer]:
    """``start(*extra_args, env=None, wait_ready=True)``, as in tests/integration."""
    with started_servers() as start:
        yield start


@pytest.fixture(scope="module")
def fresh_server(tiny_model_dir, compilation_cache_dir) -> Iterator[RunningServer]:
    """A server with the default arguments, started for the module that asks (it has served nothing)."""
    with started_servers() as start:
        yield start()
