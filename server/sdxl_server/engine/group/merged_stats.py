"""The group's stats and step histogram: its engines' figures as one engine's.

Counts and totals add up; the recent step and decode times are the engines' mean (the devices are
alike, and each engine measures its own); the flags hold only when they hold for every engine; the
retry hint is the soonest any engine expects a place to open.
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Any

from sdxl_server.engine.api import EngineStats

# Fields whose group value is the engines' sum.
_SUMMED = (
    "queue_depth",
    "slots_busy",
    "slots_total",
    "steps_total",
    "images_total",
    "compile_seconds",
    "startup_seconds",
    "work_ahead_row_steps",
    "prompt_cache_hits",
    "prompt_cache_misses",
    "lora_loads",
    "lora_evictions",
    "lora_load_seconds",
    "lora_resident",
    "lora_load_failures",
    "lora_requests",
    "unet_row_steps_run",
    "unet_row_steps_busy",
    "decodes_total",
    "decode_rows_run",
)
# Fields whose group value is the mean over the engines that measured them (non-zero).
_AVERAGED = ("step_seconds_ewma", "device_busy_ratio", "decode_seconds_ewma")

Histogram = tuple[list[tuple[float, int]], float]


def merge_stats(stats: list[EngineStats]) -> EngineStats:
    summed: dict[str, Any] = {name: sum(getattr(s, name) for s in stats) for name in _SUMMED}
    averaged: dict[str, Any] = {name: _mean_measured([getattr(s, name) for s in stats]) for name in _AVERAGED}
    by_resolution: dict[str, list[float]] = {}
    for s in stats:
        for key, seconds in s.step_seconds_by_resolution.items():
            by_resolution.setdefault(key, []).append(seconds)
    slots = summed["slots_total"]
    return dataclasses.replace(
        stats[0],
        **summed,
        **averaged,
        load=(summed["queue_depth"] + summed["slots_busy"]) / slots if slots else 0.0,
        ready=all(s.ready for s in stats),
        healthy=all(s.healthy for s in stats),
        retry_after_seconds=min(s.retry_after_seconds for s in stats),
        step_seconds_by_resolution={k: statistics.fmean(v) for k, v in sorted(by_resolution.items())},
    )


def merge_histograms(histograms: list[Histogram | None]) -> Histogram | None:
    """Cumulative step-time histograms with the same bounds (device_clock.py), added bucket by bucket."""
    present = [h for h in histograms if h is not None]
    if not present:
        return None
    buckets = [(bound, sum(h[0][i][1] for h in present)) for i, (bound, _) in enumerate(present[0][0])]
    return buckets, sum(h[1] for h in present)


def _mean_measured(values: list[float]) -> float:
    measured = [v for v in values if v > 0]
    return statistics.fmean(measured) if measured else 0.0
