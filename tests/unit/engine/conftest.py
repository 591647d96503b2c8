"""Engines shared by the engine tests: each is loaded and compiled once per session.

The session compilation cache (tests/conftest.py) makes every start after the first on a machine a load.
"""

from __future__ import annotations

import pytest
from engine_helpers import SQUARE, ManualClock, make_config
from sdxl_server.engine import JaxEngine


@pytest.fixture(scope="session")
def engine_clock() -> ManualClock:
    return ManualClock()


@pytest.fixture(scope="session")
def engine(tiny_model_dir, compilation_cache_dir, engine_clock):
    """The continuous-batching engine most tests share: 3 slots, two resolutions, K=2 steps per dispatch."""
    started = JaxEngine(make_config(tiny_model_dir, compilation_cache_dir), clock=engine_clock)
    started.start()
    yield started
    started.stop(drain_seconds=10)


@pytest.fixture(scope="session")
def static_engine(tiny_model_dir, compilation_cache_dir):
    started = JaxEngine(
        make_config(
            tiny_model_dir,
            compilation_cache_dir,
            policy="static",
            resolutions=(SQUARE,),
            steps_per_dispatch=1,
        )
    )
    started.start()
    yield started
    started.stop(drain_seconds=10)
