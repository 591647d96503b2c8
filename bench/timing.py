"""Timing one device program, shared by the benchmarks that time programs directly."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def best_seconds(run: Callable[[], Any], repeats: int = 5) -> float:
    """The fastest of `repeats` timed calls of `run`, each waited for on the device, after one untimed
    call (which may compile or warm caches)."""
    import jax

    jax.block_until_ready(run())
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        jax.block_until_ready(run())
        times.append(time.perf_counter() - began)
    return min(times)
