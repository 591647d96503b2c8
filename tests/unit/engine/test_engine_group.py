"""An engine per device (engine/group/): the routing ledger, the merge of a split request's events and
of the engines' stats in-process, and a real group of two engines on 2 simulated CPU devices in a
process of its own (the test process has one device)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from sdxl_server.engine.api import (
    CancelledError,
    DeadlineUnreachableError,
    EngineStats,
    Failed,
    Finished,
    ImageFormat,
    ImageReady,
    Progress,
    Queued,
)
from sdxl_server.engine.group.merged_stats import merge_histograms, merge_stats
from sdxl_server.engine.group.split_request import Part, SplitRequest
from sdxl_server.engine.group.work_ledger import WorkLedger
from test_engine_processes import pixels, run_engine_process

# ---- the routing ledger


def test_the_ledger_spreads_images_over_the_engines_with_the_least_work_per_slot():
    ledger = WorkLedger(3)
    assert ledger.plan(3, 8, [2, 2, 2]) == [1, 1, 1]  # idle: one image each
    ledger.add(0, 40)
    ledger.add(2, 8)
    # Engine 1 is idle, engine 2 has one image's work: 3 images go 0 / 2 / 1 (engine 0 is far behind).
    assert ledger.plan(3, 8, [2, 2, 2]) == [0, 2, 1]
    ledger.remove(2, 8)
    ledger.remove(0, 100)  # never below zero
    assert ledger.outstanding() == [0.0, 0.0, 0.0]
    # Work per slot: an engine with twice the slots takes twice the images.
    assert ledger.plan(3, 8, [4, 2, 1]) == [2, 1, 0]


# ---- a split request's merged events


class Caller:
    def __init__(self) -> None:
        self.events: list = []

    def __call__(self, event) -> None:
        self.events.append(event)


def split_of(caller: Caller, counts: list[int], cancelled: list[int], work: list[tuple[int, float]]):
    parts, first = [], 0
    for engine, count in enumerate(counts):
        parts.append(Part(engine, first, count, total_steps=4 * count, row_steps=8 * count, ticket=object()))
        first += count
    split = SplitRequest(
        "r", caller, parts, lambda e, w: work.append((e, w)), lambda part: cancelled.append(part.engine)
    )
    return split, [split.listener_of(p) for p in parts]


def image(index: int, seed: int) -> ImageReady:
    return ImageReady(index=index, seed=seed, data=b"", image_format=ImageFormat.PNG, width=64, height=64)


def test_a_split_request_reaches_its_caller_as_one_request():
    caller, cancelled, work = Caller(), [], []
    split, (part0, part1) = split_of(caller, [2, 1], cancelled, work)
    part0(Queued(position=3, prompt_truncated=False))
    part1(Queued(position=1, prompt_truncated=True))
    part1(Progress(completed_steps=2, total_steps=4))  # before every part is admitted: held
    assert caller.events == []
    split.open()
    assert caller.events == [Queued(position=1, prompt_truncated=True), Progress(2, 12)]
    part0(Progress(completed_steps=4, total_steps=8))
    part1(image(0, seed=9))  # part 1's first image is the request's image 2
    part1(Finished(0.5, 1.0, 2.0, text_encode_seconds=0.1))
    assert not split.terminal  # part 0 has images to go
    part0(image(0, seed=7))
    part0(image(1, seed=8))
    part0(Finished(0.2, 2.0, 3.0, text_encode_seconds=0.2))
    assert [type(e).__name__ for e in caller.events] == [
        "Queued", "Progress", "Progress", "ImageReady", "ImageReady", "ImageReady", "Finished",
    ]  # fmt: skip
    assert [(e.index, e.seed) for e in caller.events if isinstance(e, ImageReady)] == [(2, 9), (0, 7), (1, 8)]
    assert caller.events[2] == Progress(6, 12)
    done = caller.events[-1]
    # Queued until its first image entered a slot (part 0's 0.2 s), denoised until its last (part 0's
    # 2.2 s), the device work summed over the parts.
    assert (done.queue_seconds, done.denoise_seconds, done.total_seconds) == (0.2, 2.0, 3.0)
    assert done.text_encode_seconds == pytest.approx(0.3)
    # Each part's work left the ledger as it progressed, and nothing after it ended.
    assert sum(w for e, w in work if e == 0) == 16 and sum(w for e, w in work if e == 1) == 8
    assert cancelled == []


def test_a_failed_part_fails_the_request_once_and_cancels_the_other_parts():
    caller, cancelled, work = Caller(), [], []
    split, (part0, part1) = split_of(caller, [1, 1], cancelled, work)
    part0(Queued(0, False))
    part1(Queued(0, False))
    split.open()
    part0(Progress(2, 4))
    part1(Failed(DeadlineUnreachableError("late")))
    assert cancelled == [0] and split.terminal
    part0(image(0, 1))  # the cancelled part's stragglers: nothing after the terminal event
    part0(Failed(CancelledError("cancelled")))
    assert [type(e).__name__ for e in caller.events] == ["Queued", "Progress", "Failed"]
    assert isinstance(caller.events[-1].error, DeadlineUnreachableError)
    assert sum(w for e, w in work if e == 0) == 8 and sum(w for e, w in work if e == 1) == 8


def test_a_request_refused_by_a_later_part_tells_its_caller_nothing():
    caller, cancelled, work = Caller(), [], []
    split, (part0, _) = split_of(caller, [1, 1], cancelled, work)
    part0(Queued(0, False))
    split.parts[1].ticket = None  # its engine refused it: no ticket
    split.drop()
    assert cancelled == [0]
    part0(Failed(CancelledError("withdrawn")))
    assert caller.events == []


# ---- merged stats


def test_the_groups_stats_add_the_engines_counts_and_average_their_times():
    one = EngineStats(
        queue_depth=1, slots_busy=2, slots_total=2, load=1.5, steps_total=10, images_total=3,
        step_seconds_ewma=0.2, device_busy_ratio=0.5, compile_seconds=5, startup_seconds=9, ready=True,
        healthy=True, retry_after_seconds=2.0, step_seconds_by_resolution={"64x64": 0.2},
        prompt_cache_hits=1, unet_row_steps_run=20,
    )  # fmt: skip
    idle = dataclasses.replace(
        one, queue_depth=0, slots_busy=0, load=0.0, step_seconds_ewma=0.0, retry_after_seconds=1.0,
        step_seconds_by_resolution={"64x64": 0.4}, ready=False,
    )  # fmt: skip
    merged = merge_stats([one, idle])
    assert (merged.queue_depth, merged.slots_busy, merged.slots_total) == (1, 2, 4)
    assert merged.load == 0.75  # (1 waiting + 2 busy) / 4 slots
    assert (merged.images_total, merged.steps_total, merged.prompt_cache_hits) == (6, 20, 2)
    assert merged.step_seconds_ewma == 0.2  # the mean of the engines that measured one
    assert merged.step_seconds_by_resolution == {"64x64": pytest.approx(0.3)}
    assert merged.retry_after_seconds == 1.0 and not merged.ready and merged.healthy
    bounds = [(0.1, 1), (1.0, 3), (float("inf"), 4)]
    assert merge_histograms([(bounds, 2.0), None, (bounds, 1.0)]) == (
        [(0.1, 2), (1.0, 6), (float("inf"), 8)],
        3.0,
    )


# ---- two real engines on two devices


@pytest.fixture(scope="module")
def group_run(tiny_model_dir, compilation_cache_dir) -> dict:
    return run_engine_process(
        "group", tiny_model_dir, compilation_cache_dir, devices=2, script="engine_group_subprocess.py"
    )


@pytest.mark.slow
def test_an_engine_per_device_runs_each_on_its_own_device_as_one_engine(group_run):
    assert group_run["device_count"] == 2 and group_run["engines"] == 2
    assert group_run["engine_devices"] == [[0], [1]]
    assert group_run["aot_devices_match"]  # what `sdxl-server compile --engine-per-device` compiles for
    assert group_run["info"] == {"devices": 2, "slots": 2, "engines": 2}
    assert group_run["stats"] == {"slots_total": 2, "ready": True, "healthy": True}
    assert group_run["estimate"]
    # The group's counters are its engines' sums; its step histogram counts every engine's steps.
    assert group_run["merged_images_total"] == group_run["sum_images_total"] > 0
    assert group_run["histogram_steps"] == group_run["steps_total"] > 0


@pytest.mark.slow
def test_a_request_split_over_two_engines_draws_the_lone_engines_images(group_run):
    split = group_run["split"]
    assert split["end"] == "Finished" and split["denoise_positive"]
    events = split["events"]
    assert events[0] == "Queued" and events[-1] == "Finished" and events.count("Finished") == 1
    assert split["indices"] == [0, 1, 2] and split["seeds"] == [7, 8, 9]
    assert split["last_progress"] == [12, 12] and split["progress_never_falls"]
    assert split["images_per_engine"] == [2, 1]  # 3 images over 2 one-slot engines
    # The oracle: one engine over device 0 draws the same 3 images (image i with seed 7 + i).
    for index, encoded in group_run["lone_images"].items():
        assert np.abs(pixels(split["images"][index]) - pixels(encoded)).max() <= 1, index
    assert len(group_run["lone_images"]) == 3


@pytest.mark.slow
def test_back_to_back_requests_go_to_different_engines(group_run):
    assert group_run["routing"] == {"ends": ["Finished", "Finished"], "per_engine": [1, 1]}


@pytest.mark.slow
def test_a_cancelled_split_request_ends_once_and_frees_both_engines(group_run):
    cancel = group_run["cancel"]
    assert cancel["cancelled_error"] and cancel["terminal_events"] == 1 and cancel["last_is_terminal"]
    assert cancel["queued_first"] and cancel["follow_end"] == "Finished"


@pytest.mark.slow
def test_a_part_refused_by_a_stopped_engine_refuses_the_request_and_withdraws_the_rest(group_run):
    refused = group_run["refused"]
    assert refused["raised"] == "NotReadyError" and refused["events_to_caller"] == []
    assert refused["engine_0_follow"] == "Finished" and refused["engine_0_busy_after"] == 0
