"""Fixtures shared by every test directory.

One JAX compilation cache directory and one tiny model are shared by all tests and by the
server processes they start, so that each program is compiled once per machine.
"""

from __future__ import annotations

import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
CACHE_ROOT = pathlib.Path(os.environ.get("SDXL_TEST_CACHE_ROOT", REPO / ".cache"))
COMPILATION_CACHE_DIR = pathlib.Path(
    os.environ.get("SDXL_COMPILATION_CACHE_DIR", CACHE_ROOT / "jax-compilation-cache")
)
TINY_MODEL_DIR = pathlib.Path(os.environ.get("SDXL_TINY_MODEL_DIR", CACHE_ROOT / "tiny-sdxl"))

# Inherited by server subprocesses started from tests.
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
