"""Which steps of an image are guided (two UNet rows) and which take one row: the host's and the device's
shared rule (guidance_rows.py; denoise.py reads the same range from the slot)."""

from __future__ import annotations

import numpy as np
import pytest
from sdxl_server.engine.batching.guidance_rows import guided_steps, peak_rows, row_steps, rows_at


@pytest.mark.parametrize("scale", [0.0, 0.5, 1.0])
def test_guidance_at_or_below_one_guides_no_step(scale):
    assert guided_steps(scale, (0.0, 1.0), 20) == (0, 0)
    assert [rows_at((0, 0), 20, i) for i in range(20)] == [1] * 20


def test_full_guidance_guides_every_step():
    assert guided_steps(5.0, (0.0, 1.0), 20) == (0, 20)
    assert row_steps((0, 20), 20) == 40


def test_an_interval_ending_at_0_4_guides_the_first_8_of_20_steps_even_as_float32():
    assert guided_steps(5.0, (0.0, 0.4), 20) == (0, 8)
    assert guided_steps(5.0, (0.0, float(np.float32(0.4))), 20) == (0, 8)
    assert [rows_at((0, 8), 20, i) for i in (0, 7, 8, 19, 20)] == [2, 2, 1, 1, 0]
    assert row_steps((0, 8), 20) == 28


def test_an_interval_may_start_late_and_an_empty_one_guides_nothing():
    assert guided_steps(5.0, (0.5, 1.0), 4) == (2, 4)
    assert guided_steps(5.0, (0.3, 0.3), 10) == (0, 0)
    assert guided_steps(5.0, (0.0, 0.01), 4) == (0, 1)  # any part of a step's span counts it in


@pytest.mark.parametrize("guided", [(0, 0), (0, 8), (2, 4), (0, 20)])
def test_row_steps_from_any_step_sum_the_rows_still_to_run(guided):
    """What the deadline estimate counts for an image already part-way through its steps."""
    for start in (0, 3, 8, 19, 20, 25):
        assert row_steps(guided, 20, start) == sum(rows_at(guided, 20, i) for i in range(start, 20))
    assert peak_rows(guided) == max(rows_at(guided, 20, i) for i in range(20))
