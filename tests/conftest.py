"""Fixtures shared by every test directory.

One JAX compilation cache directory and one tiny model are shared by all tests and by the
server processes they start, so that each program is compiled once per machine.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import pytest
from sdxl_test_support.xla_flags import with_test_compile_flags

REPO = pathlib.Path(__file__).resolve().parents[1]
CACHE_ROOT = pathlib.Path(os.environ.get("SDXL_TEST_CACHE_ROOT", REPO / ".cache"))
COMPILATION_CACHE_DIR = pathlib.Path(
    os.environ.get("SDXL_COMPILATION_CACHE_DIR", CACHE_ROOT / "jax-compilation-cache")
)
TINY_MODEL_DIR = pathlib.Path(os.environ.get("SDXL_TINY_MODEL_DIR", CACHE_ROOT / "tiny-sdxl"))

# Inherited by server subprocesses started from tests. XLA_FLAGS is read when JAX starts its backend, after
# this file is imported.
os.environ["XLA_FLAGS"] = with_test_compile_flags(os.environ.get("XLA_FLAGS", ""))
os.environ["SDXL_COMPILATION_CACHE_DIR"] = str(COMPILATION_CACHE_DIR)
os.environ["SDXL_TINY_MODEL_DIR"] = str(TINY_MODEL_DIR)


@pytest.fixture(scope="session")
def compilation_cache_dir() -> pathlib.Path:
    COMPILATION_CACHE_DIR.mkdir(parents=True, exist_ok=True)
    return COMPILATION_CACHE_DIR


@pytest.fixture(scope="session")
def tiny_model_dir() -> pathlib.Path:
    """The tiny random SDXL in diffusers format, built once (see docs/ARCHITECTURE.md)."""
    from sdxl_server.engine.models.tiny_model import ensure_tiny_model

    return ensure_tiny_model(TINY_MODEL_DIR)


# Fixtures that start or compile something costly once per test process (an engine, a server). Under
# pytest-xdist (`make test` runs 2 workers with --dist loadgroup) every test that uses one runs in the
# same worker, so that each is built once per run rather than once per worker.
_COSTLY_SHARED_FIXTURES = {
    "engine": "shared-engines",
    "static_engine": "shared-engines",
    "lora_engine": "shared-engines",
    "shared_server": "integration-shared-server",
    "demo_server": "demo-server",
    "hostile_server": "hostile-server",
}
_LONGEST_GROUP = "shared-engines"  # about a quarter of the suite: started first, so no worker waits on it


def _xdist_group(item: pytest.Item) -> str:
    """The costly shared fixture's group if the test uses one, else its file (a module's fixtures, such
    as a module-scoped server, are then built once as well)."""
    for name in item.fixturenames:
        if name in _COSTLY_SHARED_FIXTURES:
            return _COSTLY_SHARED_FIXTURES[name]
    return item.nodeid.split("::")[0]


def pytest_itemcollected(item: pytest.Item) -> None:
    # Marked as each test is collected, before xdist reads the groups in its collection hook.
    item.add_marker(pytest.mark.xdist_group(_xdist_group(item)))


def _in_a_grouped_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput") and bool(getattr(config.option, "loadgroup", False))


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _in_a_grouped_worker(config):  # every worker sorts alike: they must collect the same order
        items.sort(key=lambda item: _xdist_group(item) != _LONGEST_GROUP)


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist's, on the controller
def pytest_xdist_node_collection_finished(node: Any, ids: list[str]) -> None:
    # xdist names each test "<id>@<group>"; where it cannot (pytest 9.2 with xdist 3.8: see
    # requirements/constraints.txt) every shared engine would be built once per worker, silently.
    if node.config.getvalue("dist") == "loadgroup" and ids and "@" not in ids[0]:
        raise pytest.UsageError(
            "pytest-xdist's --dist loadgroup did not name the tests' groups: this pytest and pytest-xdist "
            "do not work together (requirements/constraints.txt)"
        )
