"""The queueing model of bench/batching_model.py: its policies agree where they must, so that its
comparisons of them (docs/PERFORMANCE.md) compare the policies, not bugs of one simulator."""

from __future__ import annotations

import numpy as np
import pytest

from bench.batching_model import Workload, simulate


@pytest.mark.parametrize("growth", [1.0, 0.6])
def test_one_device_on_its_own_clock_is_the_lockstep(growth: float) -> None:
    """With one device there is no lockstep to remove: "apart" must give continuous's latencies."""
    shape = {"devices": 1, "slots": 2, "growth": growth, "decode": 1.35}
    work = Workload(rate=0.1, requests=300, seed=7)
    lockstep, _, padding = simulate("continuous", work, **shape)
    apart, _, _ = simulate("apart", work, **shape)
    np.testing.assert_allclose(apart, lockstep)
    assert padding == 0.0  # one device runs what it holds, up to its bucket (2 slots: 1 or 2 images)


def test_one_slot_per_device_static_is_continuous() -> None:
    """A batch of one image per device that waits for the whole bank is static; with one device and
    one slot, waiting for the bank is waiting for the slot, so the two policies coincide."""
    shape = {"devices": 1, "slots": 1, "growth": 1.0, "decode": 1.35}
    work = Workload(rate=0.05, requests=300, seed=3)
    static, _, _ = simulate("static", work, **shape)
    continuous, _, _ = simulate("continuous", work, **shape)
    np.testing.assert_allclose(static, continuous)


def test_the_lockstep_pads_and_costs_the_tail() -> None:
    """Two devices at 70% load: the lockstep runs image-steps no image needs, and devices on their own
    clocks finish every request no later on the tail (the model's reading in docs/PERFORMANCE.md)."""
    shape = {"devices": 2, "slots": 2, "growth": 1.0, "decode": 1.35}
    capacity = simulate("continuous", Workload(100.0, 2000, seed=0), **shape)[1]
    work = Workload(0.7 * capacity, 1000, seed=1)
    lockstep, _, padding = simulate("continuous", work, **shape)
    apart, _, _ = simulate("apart", work, **shape)
    static, _, _ = simulate("static", work, **shape)
    assert 0.05 < padding < 0.5
    assert np.percentile(apart, 99) < np.percentile(lockstep, 99) < np.percentile(static, 99)
    assert (lockstep > 0).all() and (apart > 0).all() and (static > 0).all()  # every request finished
