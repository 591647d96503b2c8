"""A request's expected time before it starts, counted in UNet rows (request_budget.py): the capacity is
two rows a slot per step, a guided image takes two and an unguided one one."""

from __future__ import annotations

import dataclasses

import pytest
from engine_helpers import SQUARE
from sdxl_server.engine.api import EngineStats
from sdxl_server.engine.batching.guidance_rows import guided_steps, row_steps
from sdxl_server.engine.request_budget import estimate_seconds, own_seconds

STEP, DECODE = 0.1, 0.05

# Two slots (four rows a step), both taken, at a measured step of 0.1 s and decode of 0.05 s.
BUSY = EngineStats(
    queue_depth=0,
    slots_busy=2,
    slots_total=2,
    load=1.0,
    steps_total=0,
    images_total=0,
    step_seconds_ewma=STEP,
    device_busy_ratio=1.0,
    compile_seconds=0.0,
    startup_seconds=0.0,
    ready=True,
    healthy=True,
    decode_seconds_ewma=DECODE,
)


def test_queued_unguided_work_is_waited_for_at_its_rows_not_its_images():
    """Eight unguided images of 20 steps ahead: 160 row-steps, 40 full steps of four rows (counted in
    images over the slots they would read as 80, twice the wait)."""
    unguided = row_steps(guided_steps(0.0, (0.0, 1.0), 20), 20)
    ahead = dataclasses.replace(BUSY, queue_depth=8, work_ahead_row_steps=8 * unguided)
    assert estimate_seconds(ahead, 1, 4, rows_per_image=2) == pytest.approx(40 * STEP + 4 * STEP + DECODE)


def test_guided_work_ahead_costs_twice_its_unguided_rows():
    guided = row_steps(guided_steps(5.0, (0.0, 1.0), 20), 20)
    ahead = dataclasses.replace(BUSY, queue_depth=4, work_ahead_row_steps=4 * guided)
    assert estimate_seconds(ahead, 1, 4, rows_per_image=2) == pytest.approx(40 * STEP + 4 * STEP + DECODE)


def test_free_rows_take_unguided_images_without_a_wait_where_slots_alone_would_not():
    """One of two slots free is two rows: room for two unguided images now, not for two guided ones."""
    half = dataclasses.replace(BUSY, slots_busy=1, work_ahead_row_steps=40)
    assert estimate_seconds(half, 2, 4, rows_per_image=1) == pytest.approx(4 * STEP + DECODE)
    assert estimate_seconds(half, 2, 4, rows_per_image=2) == pytest.approx(10 * STEP + 4 * STEP + DECODE)


def test_an_idle_server_runs_twice_as_many_unguided_images_in_one_round():
    idle = dataclasses.replace(BUSY, slots_busy=0)
    assert own_seconds(idle, 4, 10, rows_per_image=1, resolution=SQUARE) == pytest.approx(10 * STEP)
    assert own_seconds(idle, 4, 10, rows_per_image=2, resolution=SQUARE) == pytest.approx(20 * STEP)
    measured = dataclasses.replace(idle, step_seconds_by_resolution={str(SQUARE): 0.3})
    assert own_seconds(measured, 1, 10, rows_per_image=2, resolution=SQUARE) == pytest.approx(3.0)


def test_nothing_is_estimated_before_a_step_was_measured():
    unmeasured = dataclasses.replace(BUSY, step_seconds_ewma=0.0)
    assert estimate_seconds(unmeasured, 1, 4, rows_per_image=2) is None
    assert own_seconds(unmeasured, 1, 4, rows_per_image=2) is None
