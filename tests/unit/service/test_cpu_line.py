"""A CPU-limited pod's CPU per batched step at full occupancy (service/cpu_line.py), fitted over made-up
scrape intervals shaped like the probe's (docs/AUTOSCALING.md, "Where a partly busy pod's CPU goes"):
0.005 CPU seconds a batched step plus 0.005 per busy slot, 4 slots, 0.3 CPU, so a full pod spends 0.025
CPU seconds a batched step and an image-step costs it 0.025 / 0.3 slot-seconds."""

from __future__ import annotations

import pytest
from sdxl_server.service.cpu_line import CpuInterval, CpuLine, full_pod_cpu_per_batched_step

FULL_PRICE = 0.025 / 0.3


def _interval(
    busy_slots: float, fixed: float = 0.005, per_slot: float = 0.005, noise: float = 0.0
) -> CpuInterval:
    batched = 200
    return CpuInterval(
        cpu_seconds=batched * (fixed + per_slot * busy_slots + noise),
        image_steps=round(batched * busy_slots),
        batched_steps=batched,
    )


def _line(intervals: list[CpuInterval]) -> CpuLine:
    line = CpuLine()
    for interval in intervals:
        line.add(interval)
    return line


def test_the_line_through_partly_busy_intervals_prices_a_full_pod() -> None:
    # Occupancies of 1 to 2.5 busy slots, each with a little noise; the per-image-step figure at these
    # occupancies reads 1.26x the full pod's price over them all.
    noise = [0.0002, -0.0001, 0.00015, -0.0002, 0.0001, -0.00005]
    busy = [1.0, 1.3, 1.9, 2.5, 1.6, 2.2]
    line = _line([_interval(b, noise=n) for b, n in zip(busy, noise, strict=True)])
    price = line.price(slots=4, cpus=0.3)
    assert price == pytest.approx(FULL_PRICE, rel=0.05)
    per_image_step = (
        4 * sum(_interval(b).cpu_seconds for b in busy) / sum(_interval(b).image_steps for b in busy)
    )
    assert per_image_step / 0.3 > 1.25 * FULL_PRICE  # what the fit replaces


def test_intervals_too_alike_in_occupancy_fit_no_line() -> None:
    # A steady pod: every interval near 1.3 busy slots, noise as large as the spread; extrapolating to 4
    # slots is too uncertain, so the caller keeps its per-image-step price.
    noise = [0.0003, -0.0003, 0.0002, -0.0002, 0.0003, -0.0001]
    busy = [1.28, 1.3, 1.32, 1.29, 1.31, 1.3]
    assert _line([_interval(b, noise=n) for b, n in zip(busy, noise, strict=True)]).price(4, 0.3) is None
    # Every interval at the same occupancy: no line at all.
    assert full_pod_cpu_per_batched_step([_interval(2.0)] * 6, slots=4) is None


def test_too_few_intervals_or_a_falling_line_fit_nothing() -> None:
    assert _line([_interval(1.0), _interval(2.0), _interval(3.0)]).price(4, 0.3) is None
    # CPU per batched step falling as slots fill: noise, not a cost.
    assert (
        _line([_interval(b, per_slot=-0.001, fixed=0.01) for b in (1.0, 1.5, 2.0, 2.5)]).price(4, 0.3) is None
    )


def test_the_fit_stays_within_what_the_intervals_prove() -> None:
    # A steep line with a negative fixed term (not physical: noise) would extrapolate to 0.07 CPU seconds;
    # the per-image-step figure over the intervals, 0.02 x 4 / 1.5, is the most a full pod can cost.
    steep = [_interval(b, fixed=-0.01, per_slot=0.02) for b in (1.0, 4 / 3, 5 / 3, 2.0)]
    assert full_pod_cpu_per_batched_step(steep, slots=4) == pytest.approx(0.02 * 4 / 1.5, rel=0.01)
    # A line flatter than the data's mean allows is raised to it: a full pod's batched step costs at
    # least one at the mean occupancy.
    assert full_pod_cpu_per_batched_step(
        [_interval(b) for b in (1.0, 2.0, 3.0, 4.0)], slots=2
    ) == pytest.approx(0.005 + 0.005 * 2.5)


def test_only_the_recent_intervals_count() -> None:
    line = CpuLine(max_intervals=4)
    for b in (1.0, 1.5, 2.0, 2.5):  # an old cost, twice today's
        line.add(_interval(b, fixed=0.01, per_slot=0.01))
    for b in (1.0, 1.5, 2.0, 2.5):
        line.add(_interval(b))
    assert line.price(4, 0.3) == pytest.approx(FULL_PRICE)


def test_bad_window_is_refused_naming_it() -> None:
    with pytest.raises(ValueError, match="max_intervals"):
        CpuLine(max_intervals=2)
