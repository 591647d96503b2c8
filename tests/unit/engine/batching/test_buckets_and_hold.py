"""Batch buckets and the decode-hold rule: pure functions, no device."""

from __future__ import annotations

import pytest
from sdxl_server.engine.batching.buckets import (
    bucket_sizes,
    covering_bucket,
    largest_fitting,
    row_bucket_sizes,
)
from sdxl_server.engine.batching.decode_hold import decode_now


@pytest.mark.parametrize(
    ("per_device", "expected"),
    [(1, (1,)), (2, (1, 2)), (3, (1, 2, 3)), (4, (1, 2, 4)), (6, (1, 2, 4, 6)), (8, (1, 2, 4, 8))],
)
def test_buckets_are_powers_of_two_then_the_block(per_device, expected):
    assert bucket_sizes(per_device) == expected


@pytest.mark.parametrize(
    ("slots_per_device", "expected"),
    [(1, (1, 2)), (2, (1, 2, 3, 4)), (3, (1, 2, 4, 5, 6)), (4, (1, 2, 4, 7, 8))],
)
def test_row_buckets_are_powers_of_two_then_one_short_of_the_capacity_then_it(slots_per_device, expected):
    # 2P - 1: a full device with one image at one row (its guidance interval over) pads nothing.
    assert row_bucket_sizes(slots_per_device) == expected
    assert covering_bucket(expected, 2 * slots_per_device - 1) == 2 * slots_per_device - 1


def test_covering_bucket_rounds_up_and_refuses_more_than_the_block():
    sizes = bucket_sizes(4)
    assert [covering_bucket(sizes, n) for n in (1, 2, 3, 4)] == [1, 2, 4, 4]
    with pytest.raises(ValueError, match="exceed"):
        covering_bucket(sizes, 5)


def hold(held, waited=0, budget=4, soonest=None, arriving=None, capacity=2) -> bool:
    devices = len(held)
    return decode_now(held, waited, budget, soonest or [None] * devices, arriving or [0] * devices, capacity)


def test_a_dispatch_runs_the_most_steps_no_slot_overshoots():
    sizes = bucket_sizes(4)  # K = 4: 1, 2 and 4 steps per dispatch are compiled
    assert [largest_fitting(sizes, left) for left in (1, 2, 3, 4, 9)] == [1, 2, 2, 4, 4]
    assert largest_fitting((1,), 7) == 1


def test_nothing_held_nothing_to_decode():
    assert not hold([0, 0], soonest=[1, 1])


def test_one_device_decodes_at_once():
    assert hold([1])


def test_waits_while_another_device_finishes_within_the_budget():
    assert not hold([1, 0], soonest=[None, 3])


def test_does_not_wait_for_a_device_that_finishes_after_the_budget_or_has_nothing():
    assert hold([1, 0], waited=2, soonest=[None, 3])  # 3 steps left, 2 of 4 spent
    assert hold([1, 0], soonest=[None, None])  # a lone request on a 2-device server


def test_the_budget_is_a_bound():
    assert hold([1, 0], waited=4, soonest=[None, 1])


def test_every_device_holding_an_image_decodes_now():
    assert hold([1, 2], soonest=[1, 1])


def test_decodes_before_the_buffer_could_overflow():
    assert hold([2, 0], soonest=[1, 1], arriving=[1, 0], capacity=2)


def test_without_a_deep_backlog_the_hold_is_pure_latency_and_decodes_now():
    """The hold buys throughput; it engages only while enough images wait to refill every slot."""
    assert not decode_now([1, 0], 0, 4, [None, 3], [0, 0], 2, backlog_deep=True)
    assert decode_now([1, 0], 0, 4, [None, 3], [0, 0], 2, backlog_deep=False)
