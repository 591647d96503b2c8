"""sdxl_demand's arithmetic (service/demand.py): image-steps arriving per second x step seconds / slots.

A pod with 4 slots, 8-step images and a 0.1 s step serves 4 / (8 x 0.1) = 5 images/s: 5 images/s arriving
is 1.0 pod, 12 images/s is 2.4 pods, whatever its queue does with them. A fake clock, no server.
"""

from __future__ import annotations

import dataclasses

import pytest
from sdxl_server.engine.api import EngineStats, GenerationRequest, Resolution
from sdxl_server.server_settings import ConfigError, parse_serve_config
from sdxl_server.service.demand import (
    ATTEMPT_HEADER,
    Arrival,
    DemandMeter,
    demand,
    histogram_count,
    parse_attempt,
)

R64 = Resolution(64, 64)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _request(
    request_id: str, images: int = 1, steps: int = 8, resolution: Resolution = R64
) -> GenerationRequest:
    return GenerationRequest(
        request_id=request_id,
        prompt="a lighthouse",
        negative_prompt="",
        seed=1,
        num_images=images,
        steps=steps,
        guidance_scale=5.0,
        resolution=resolution,
    )


def _stats(
    step_seconds: float = 0.1, slots: int = 4, by_resolution: dict[str, float] | None = None
) -> EngineStats:
    return EngineStats(
        queue_depth=0,
        slots_busy=0,
        slots_total=slots,
        load=0.0,
        steps_total=0,
        images_total=0,
        step_seconds_ewma=step_seconds,
        device_busy_ratio=0.0,
        compile_seconds=0.0,
        startup_seconds=0.0,
        ready=True,
        healthy=True,
        step_seconds_by_resolution={str(R64): step_seconds} if by_resolution is None else by_resolution,
    )


def _arrive(meter: DemandMeter, clock: FakeClock, per_second: float, seconds: float, prefix: str) -> None:
    for i in range(round(per_second * seconds)):
        # Mid-interval instants: none sits on a window's edge, where float sums could tip either way.
        clock.now += 0.5 / per_second
        meter.arrived(_request(f"{prefix}-{i}"))
        clock.now += 0.5 / per_second


def test_a_pods_capacity_arriving_reads_one_pod() -> None:
    clock = FakeClock()
    meter = DemandMeter(10.0, clock)
    _arrive(meter, clock, per_second=5.0, seconds=10.0, prefix="a")
    assert meter.value(_stats()) == pytest.approx(1.0)


def test_a_step_to_2_4_times_capacity_reads_2_4_pods_within_one_window() -> None:
    clock = FakeClock()
    meter = DemandMeter(10.0, clock)
    _arrive(meter, clock, per_second=3.0, seconds=20.0, prefix="before")
    assert meter.value(_stats()) == pytest.approx(0.6)
    _arrive(meter, clock, per_second=12.0, seconds=10.0, prefix="step")
    # Nothing is capped: a queue of 32 on 4 slots would show at most (32 + 4) / 4 = 9, and a queue of 4
    # at most 2, however much arrives; demand shows what arrives.
    assert meter.value(_stats()) == pytest.approx(2.4)


def test_cost_is_images_times_steps_at_the_resolutions_step_time() -> None:
    arrivals = [
        Arrival(0.0, image_steps=4 * 8, resolution="64x64"),  # 32 image-steps x 0.1 s = 3.2 slot-seconds
        Arrival(0.0, image_steps=1 * 20, resolution="128x64"),  # 20 x 0.3 s = 6 slot-seconds
        Arrival(0.0, image_steps=10, resolution="128x128"),  # not measured yet: the overall 0.2 s, 2
    ]
    by_resolution = {"64x64": 0.1, "128x64": 0.3}
    # (3.2 + 6 + 2) slot-seconds over a 2 s window and 4 slots.
    assert demand(arrivals, 2.0, by_resolution, 0.2, 4) == pytest.approx(11.2 / 2.0 / 4)
    assert demand(arrivals, 2.0, by_resolution, 0.2, 0) == 0.0


def test_before_the_engine_measured_a_step_demand_is_zero() -> None:
    clock = FakeClock()
    meter = DemandMeter(10.0, clock)
    meter.arrived(_request("x"))
    assert meter.value(_stats(step_seconds=0.0, by_resolution={})) == 0.0


def test_arrivals_leave_the_window() -> None:
    clock = FakeClock()
    meter = DemandMeter(10.0, clock)
    _arrive(meter, clock, per_second=5.0, seconds=10.0, prefix="a")
    clock.now += 5.0
    assert meter.value(_stats()) == pytest.approx(0.5)  # the older half has left
    clock.now += 5.0
    assert meter.value(_stats()) == 0.0


def test_a_retry_counts_once_per_window_not_once_per_attempt() -> None:
    clock = FakeClock()
    meter = DemandMeter(10.0, clock)
    for _ in range(30):  # one request refused and retried 30 times within the window
        meter.arrived(_request("same", images=4))
        clock.now += 0.2
    assert meter.value(_stats()) == pytest.approx(4 * 8 * 0.1 / 10.0 / 4)
    clock.now += 10.0
    meter.arrived(_request("same", images=4))  # still asked for after a whole window: counted again
    assert meter.value(_stats()) == pytest.approx(4 * 8 * 0.1 / 10.0 / 4)


def test_the_window_must_be_positive_and_the_setting_names_itself() -> None:
    with pytest.raises(ValueError, match="demand_window_seconds"):
        DemandMeter(0.0)
    assert parse_serve_config(["--demand-window-seconds", "2.5"], env={}).demand_window_seconds == 2.5
    with pytest.raises(ConfigError, match="--demand-window-seconds: must be positive"):
        parse_serve_config(["--demand-window-seconds", "0"], env={})


def test_a_partly_busy_pod_prices_its_work_at_the_full_batchs_step_time() -> None:
    # Warm-up measured a full bank at 0.1 s; with one slot of four busy the engine's recent step takes
    # 0.05 s, which would halve the demand of the same arrivals; a saturated pod's 0.12 s replaces it.
    clock = FakeClock()
    meter = DemandMeter(10.0, clock)
    assert meter.value(_stats(step_seconds=0.1)) == 0.0  # the first measurement: the warm-up's full bank
    _arrive(meter, clock, per_second=5.0, seconds=10.0, prefix="a")
    quiet = _stats(step_seconds=0.05)
    assert meter.value(quiet) == pytest.approx(1.0)
    full = dataclasses.replace(_stats(step_seconds=0.12), slots_busy=4)
    assert meter.value(full) == pytest.approx(1.2)
    assert meter.value(quiet) == pytest.approx(1.2)


def test_only_first_attempts_count_refused_ones_included() -> None:
    # A refused first attempt is demand (that is the signal's point); its retries, wherever they land,
    # are the same demand again and must not add to it.
    clock = FakeClock()
    meter = DemandMeter(10.0, clock)
    meter.arrived(_request("a", images=4), attempt=1)
    for attempt in range(2, 31):  # retries with new ids (another client's copy) still do not count
        meter.arrived(_request(f"a-{attempt}", images=4), attempt=attempt)
        clock.now += 0.2
    assert meter.value(_stats()) == pytest.approx(4 * 8 * 0.1 / 10.0 / 4)


def test_the_attempt_header_is_a_positive_integer_named_in_the_error() -> None:
    assert parse_attempt(None) == 1
    assert parse_attempt("") == 1
    assert parse_attempt("3") == 3
    for bad in ("0", "-1", "two", "1.5"):
        with pytest.raises(ValueError, match=f"{ATTEMPT_HEADER} must be a positive integer"):
            parse_attempt(bad)


def test_a_saturated_pod_prices_an_image_step_at_its_measured_wall_time() -> None:
    # The device says 0.1 s a step of 4 slots, but with host work between steps the pod completes only
    # 4 image-steps every 0.25 s: an image-step holds a slot 0.25 s, and 5 images/s of 8 steps
    # (40 image-steps/s) are 40 x 0.25 / 4 = 2.5 pods, not 1.0.
    clock = FakeClock()
    meter = DemandMeter(10.0, clock)
    _arrive(meter, clock, per_second=5.0, seconds=10.0, prefix="a")
    full = dataclasses.replace(_stats(step_seconds=0.1), slots_busy=4, queue_depth=8)
    assert meter.value(full) == pytest.approx(1.0)  # one saturated snapshot: nothing measured yet
    for _ in range(40):  # the price moves towards the measurement at each saturated scrape
        clock.now += 1.0
        full = dataclasses.replace(full, steps_total=full.steps_total + 16)  # 4 steps of 4 slots a second
        meter.value(full)
    # The window moved on without arrivals: the same rate again, read on a snapshot that is not
    # saturated (it keeps the measured price).
    _arrive(meter, clock, per_second=5.0, seconds=10.0, prefix="b")
    assert meter.value(dataclasses.replace(full, slots_busy=3)) == pytest.approx(2.5, rel=1e-3)


def test_an_idle_interval_measures_no_throughput() -> None:
    # Snapshots that are not both saturated say nothing about a slot's price: a pod with free slots
    # completes few image-steps because few arrive, not because each costs more.
    clock = FakeClock()
    meter = DemandMeter(10.0, clock)
    _arrive(meter, clock, per_second=5.0, seconds=10.0, prefix="a")
    partly = dataclasses.replace(_stats(step_seconds=0.1), slots_busy=2)
    for _ in range(10):
        clock.now += 1.0
        partly = dataclasses.replace(partly, steps_total=partly.steps_total + 1)
        meter.value(partly)
    _arrive(meter, clock, per_second=5.0, seconds=10.0, prefix="b")
    assert meter.value(partly) == pytest.approx(1.0)


def test_a_pod_never_saturated_prices_an_image_step_at_its_served_slot_time() -> None:
    # The device says 0.1 s a step; the requests served took 2 s to denoise their 8 steps (host work and
    # the CPU shared with it): an image-step held its slot 0.25 s, whatever the occupancy, so 5 images/s
    # read 2.5 pods where the device's price read 1.0 (new pods at 80% never saturate to learn it).
    clock = FakeClock()
    meter = DemandMeter(10.0, clock)
    _arrive(meter, clock, per_second=5.0, seconds=10.0, prefix="a")
    partly = dataclasses.replace(_stats(step_seconds=0.1), slots_busy=3)
    assert meter.value(partly) == pytest.approx(1.0)
    for i in range(5):
        meter.served(_request(f"a-{i}"), denoise_seconds=8 * 0.25)
    assert meter.value(partly) == pytest.approx(2.5)
    clock.now += 20.0  # the served requests leave the window; the price learnt stays
    _arrive(meter, clock, per_second=5.0, seconds=10.0, prefix="b")
    assert meter.value(partly) == pytest.approx(2.5)


def test_slot_time_counts_the_slots_a_request_held_and_never_lowers_the_device_price() -> None:
    clock = FakeClock()
    meter = DemandMeter(10.0, clock)
    _arrive(meter, clock, per_second=5.0, seconds=10.0, prefix="a")
    stats = _stats(step_seconds=0.1, slots=4)
    # One slot busy runs a smaller program: 0.05 s an image-step is below the full batch's 0.1 s.
    meter.served(_request("small"), denoise_seconds=8 * 0.05)
    assert meter.value(stats) == pytest.approx(1.0)
    # 8 images on 4 slots: two rounds of 8 steps at 0.25 s, 4 s, holding 4 slots: 16 slot-seconds for
    # 64 image-steps is 0.25 s each (both requests together: (0.4 + 16) / (8 + 64)).
    meter.served(_request("eight", images=8), denoise_seconds=2 * 8 * 0.25)
    assert meter.value(stats) == pytest.approx(5.0 * 8 * (16.4 / 72) / 4)


class FakeCpu:
    def __init__(self) -> None:
        self.seconds = 5.0

    def __call__(self) -> float:
        return self.seconds


def test_a_cpu_limited_pod_prices_an_image_step_at_its_cpu_seconds_over_its_cpus() -> None:
    # 4 slots, the device's full batch 0.02 s a step, 0.3 CPU: each image-step spends 0.006 CPU-seconds
    # (the step, the host's share, encoding, gRPC), so the pod serves 0.3 / 0.006 = 50 image-steps/s, an
    # image-step costs 4 / 50 = 0.08 slot-seconds, and 5 images/s of 8 steps (40 image-steps/s) are 0.8
    # pods, at any occupancy: the device's price read 0.2.
    clock, cpu = FakeClock(), FakeCpu()
    meter = DemandMeter(10.0, clock, cpu_clock=cpu, cpus=lambda: 0.3)
    _arrive(meter, clock, per_second=5.0, seconds=10.0, prefix="a")
    partly = dataclasses.replace(_stats(step_seconds=0.02), slots_busy=2)
    assert meter.value(partly) == pytest.approx(0.2)  # the first reading: nothing measured yet
    partly = dataclasses.replace(partly, steps_total=400)  # 10 s of 40 image-steps a second
    cpu.seconds += 400 * 0.006
    assert meter.value(partly) == pytest.approx(0.8)
    # Fewer image-steps than slots since the last reading: nothing to divide by yet, the price stays.
    cpu.seconds += 1.0
    assert meter.value(dataclasses.replace(partly, steps_total=402)) == pytest.approx(0.8)


def test_without_a_cpu_limit_the_cpu_is_not_priced() -> None:
    clock, cpu = FakeClock(), FakeCpu()
    meter = DemandMeter(10.0, clock, cpu_clock=cpu, cpus=lambda: None)
    _arrive(meter, clock, per_second=5.0, seconds=10.0, prefix="a")
    stats = _stats(step_seconds=0.02)
    meter.value(stats)
    cpu.seconds += 400 * 0.006
    assert meter.value(dataclasses.replace(stats, steps_total=400)) == pytest.approx(0.2)


def test_with_batched_steps_counted_a_partly_busy_pod_prices_its_cpu_at_a_full_batch() -> None:
    # The same 4-slot, 0.3-CPU pod spending 0.005 CPU seconds a batched step plus 0.005 a busy slot,
    # scraped at 1 to 3 busy slots: a full pod spends 0.025 a batched step, 0.025 / 0.3 slot-seconds an
    # image-step, so 40 image-steps/s arriving are 40 x 0.0833 / 4 = 0.833 pods. The per-image-step
    # figure at these occupancies, all a meter without the batched steps has, reads more.
    def run(count_batched: bool) -> float:
        clock, cpu, batched = FakeClock(), FakeCpu(), [0]
        meter = DemandMeter(
            10.0,
            clock,
            cpu_clock=cpu,
            cpus=lambda: 0.3,
            batched_steps=(lambda: batched[0]) if count_batched else (lambda: None),
        )
        _arrive(meter, clock, per_second=5.0, seconds=10.0, prefix="a")
        stats = dataclasses.replace(_stats(step_seconds=0.02), slots_busy=2)
        meter.value(stats)
        for busy in (1.0, 2.0, 3.0, 1.5, 2.5):
            batched[0] += 200
            cpu.seconds += 200 * (0.005 + 0.005 * busy)
            stats = dataclasses.replace(stats, steps_total=stats.steps_total + round(200 * busy))
            value = meter.value(stats)
        return value

    assert run(count_batched=True) == pytest.approx(40 * 0.025 / 0.3 / 4)
    assert run(count_batched=False) > 1.15 * 40 * 0.025 / 0.3 / 4


def test_the_batched_steps_are_the_step_histograms_count() -> None:
    # JaxEngine.step_histogram: cumulative (upper bound, count) pairs ending with +inf, and the sum.
    assert histogram_count(([(0.01, 3), (0.1, 7), (float("inf"), 9)], 0.4)) == 9
    assert histogram_count(None) is None
