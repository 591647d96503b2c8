"""Continuous batching on the shared engine: independence of batch-mates, joining mid-way, event order.

Order is asserted on the engine's own trace (step boundaries), never on wall-clock time. Requests that
must overlap are submitted from inside another request's Progress delivery, which runs on the step loop
between two boundaries, so the overlap is certain.
"""

from __future__ import annotations

import numpy as np
import pytest
from engine_helpers import SQUARE, WIDE, Recorder, max_level_difference, request, run
from sdxl_server.engine.api import Finished, ImageFormat, Queued


def events_of(engine, request_id: str, kind: str):
    return [e for e in engine.trace() if e.request_id == request_id and e.kind == kind]


def test_an_image_does_not_depend_on_its_batch_mates_or_its_slot(engine):
    probe = dict(prompt="a lighthouse at night", seed=11, steps=4, resolution=SQUARE)
    alone = run(engine, request("probe-alone", **probe)).images()[0]

    # A full batch: two other requests with other prompts, seeds and step counts take slots 0 and 1.
    mates = [
        Recorder(),
        Recorder(),
    ]
    engine.submit(request("mate-1", prompt="a forest", seed=1, steps=6), mates[0])
    engine.submit(request("mate-2", prompt="a desert", negative_prompt="sand", seed=2, steps=5), mates[1])
    full = run(engine, request("probe-full", **probe)).images()[0]
    for mate in mates:
        assert isinstance(mate.wait(), Finished)

    # Another slot: one batch-mate ahead of it, at the other resolution bank too.
    other = Recorder()
    engine.submit(request("mate-3", prompt="a city", seed=3, steps=6, resolution=WIDE), other)
    engine.submit(request("mate-4", prompt="a river", seed=4, steps=6), Recorder())
    moved = run(engine, request("probe-moved", **probe)).images()[0]
    other.wait()

    slots = [events_of(engine, rid, "admit")[-1].slot for rid in ("probe-alone", "probe-full", "probe-moved")]
    assert len(set(slots)) >= 2, f"the probe ran in the same slot every time: {slots}"
    steps_with_mates = [e for e in engine.trace() if e.kind == "step" and "slots=3" in e.detail]
    assert steps_with_mates, "the batch was never full"
    assert max_level_difference(alone, full) <= 1
    assert max_level_difference(alone, moved) <= 1


def test_a_request_joins_at_the_next_boundary_and_can_finish_first(engine):
    joined = Recorder()

    def join_once(progress) -> None:
        if progress.completed_steps >= 4 and not joined.events:
            engine.submit(request("short", seed=2, steps=2), joined)

    long_running = Recorder(on_progress=join_once)
    engine.submit(request("long", seed=1, steps=12), long_running)
    assert isinstance(long_running.wait(), Finished)
    assert isinstance(joined.wait(), Finished)

    (submitted,) = events_of(engine, "short", "submit")
    (admitted,) = events_of(engine, "short", "admit")
    (short_done,) = events_of(engine, "short", "finish")
    (long_done,) = events_of(engine, "long", "finish")
    assert admitted.boundary == submitted.boundary, "did not start at the next step boundary"
    assert admitted.boundary < long_done.boundary, "did not join while the long request was mid-way"
    assert short_done.boundary < long_done.boundary, "the shorter request did not finish first"


def test_events_arrive_in_contract_order(engine):
    recorder = run(engine, request("order", seed=9, num_images=2, steps=3, resolution=WIDE))
    kinds = [type(e).__name__ for e in recorder.events]
    assert kinds[0] == "Queued" and kinds[-1] == "Finished"
    assert kinds.count("ImageReady") == 2 and kinds.count("Finished") == 1
    progress = [e for e in recorder.events if type(e).__name__ == "Progress"]
    completed = [p.completed_steps for p in progress]
    assert completed == sorted(completed) and completed[-1] == 6 and progress[-1].total_steps == 6
    seeds = sorted(e.seed for e in recorder.events if type(e).__name__ == "ImageReady")
    assert seeds == [9, 10]


@pytest.mark.parametrize(
    ("image_format", "magic"), [(ImageFormat.JPEG, b"\xff\xd8\xff"), (ImageFormat.WEBP, b"RIFF")]
)
def test_lossy_formats(engine, image_format, magic):
    recorder = run(engine, request(f"format-{image_format.value}", steps=1, image_format=image_format))
    (image,) = [e for e in recorder.events if type(e).__name__ == "ImageReady"]
    assert image.image_format is image_format and image.data.startswith(magic)
    assert recorder.images()[0].shape == (64, 64, 3)


def test_long_prompts_are_truncated_and_reported(engine):
    long_prompt = " ".join(["a very detailed painting of a castle"] * 30)
    recorder = run(engine, request("long-prompt", prompt=long_prompt, steps=1))
    short = run(engine, request("short-prompt", prompt="a castle", steps=1))
    assert recorder.events[0] == Queued(position=0, prompt_truncated=True)
    assert isinstance(short.events[0], Queued) and not short.events[0].prompt_truncated


def test_stats_count_the_work(engine):
    before = engine.stats()
    run(engine, request("stats", num_images=2, steps=3))
    after = engine.stats()
    assert after.images_total - before.images_total == 2
    assert after.steps_total - before.steps_total == 6
    assert after.slots_total == 3 and after.ready and after.healthy
    assert after.step_seconds_ewma > 0 and after.compile_seconds > 0 and after.startup_seconds > 0
    estimate = engine.estimate_seconds(1, 4)
    assert estimate is not None and estimate > 0
    info = engine.info()
    assert info.slots == 3 and info.devices == 1 and info.limits.max_prompt_tokens == 77
    assert np.isclose(after.load, (after.queue_depth + after.slots_busy) / after.slots_total)


def test_stats_count_the_rows_the_batches_ran_padding_included(engine):
    """The shared engine: 1 device, 3 slots, steps per dispatch 1 and 2, row buckets 1, 2, 4, 6."""
    before = engine.stats()
    # Two guided images (4 rows, bucket 4: full), 3 steps: a dispatch of 2 steps, then one of 1.
    run(engine, request("rows-guided", num_images=2, steps=3))
    middle = engine.stats()
    assert middle.unet_row_steps_busy - before.unet_row_steps_busy == 2 * 2 * 3
    assert middle.unet_row_steps_run - before.unet_row_steps_run == 4 * 2 + 4 * 1
    assert middle.decodes_total - before.decodes_total == 1  # both finished at one boundary
    assert middle.decode_rows_run - before.decode_rows_run == 2
    # Three unguided images (1 row each: 3 rows in bucket 4, one padded), 2 steps in one dispatch.
    run(engine, request("rows-unguided", num_images=3, steps=2, guidance_scale=1.0))
    after = engine.stats()
    assert after.unet_row_steps_busy - middle.unet_row_steps_busy == 3 * 1 * 2
    assert after.unet_row_steps_run - middle.unet_row_steps_run == 4 * 2
    assert after.decodes_total - middle.decodes_total == 1
    assert after.decode_rows_run - middle.decode_rows_run >= 3


def test_a_request_alone_runs_several_steps_per_dispatch(engine):
    """Nobody waits to join, so the engine runs K=2 steps per dispatch (same images: see the oracle)."""
    run(engine, request("alone-k", seed=21, steps=6))
    (admitted,) = events_of(engine, "alone-k", "admit")
    (finished,) = events_of(engine, "alone-k", "finish")
    steps = [
        e for e in engine.trace() if e.kind == "step" and admitted.boundary < e.boundary <= finished.boundary
    ]
    assert [e.detail.split()[0] for e in steps] == ["k=2"] * 3


def test_a_full_bank_runs_several_steps_per_dispatch_while_an_image_waits(engine):
    """4 images on 3 slots: the fourth waits, but no slot can free before K=2 steps, so K=2 still runs."""
    run(engine, request("full-k", seed=22, steps=6, num_images=4))
    admits = events_of(engine, "full-k", "admit")
    finishes = events_of(engine, "full-k", "finish")
    assert len(admits) == 4 and len({e.boundary for e in admits}) == 2, "no image ever waited for a slot"
    first, last = min(e.boundary for e in admits), max(e.boundary for e in finishes)
    steps = [e for e in engine.trace() if e.kind == "step" and first < e.boundary <= last]
    waited_steps = [e for e in steps if e.boundary <= max(e.boundary for e in admits)]
    assert waited_steps and all(e.detail.startswith("k=2") for e in waited_steps), waited_steps
    assert [e.detail.split()[0] for e in steps] == ["k=2"] * 6


def test_decodes_of_one_image_per_call_give_each_image_its_own_pixels(
    engine, tiny_model_dir, compilation_cache_dir
):
    """max_decode_batch 1 (what lets 4 slots fit a v5e chip at 1024x1024): three images that finish at
    the same step are decoded in three calls, from held rows 0, 1 and 2, and each equals the image the
    shared engine makes with decodes of up to 3 images."""
    from engine_helpers import make_config
    from sdxl_server.engine import JaxEngine

    asked = dict(prompt="three lighthouses", seed=5, steps=3, num_images=3, resolution=SQUARE)
    one_per_call = JaxEngine(
        make_config(
            tiny_model_dir,
            compilation_cache_dir,
            resolutions=(SQUARE,),
            steps_per_dispatch=1,
            max_decode_batch=1,
            decode_hold_steps=0,
        )
    )
    one_per_call.start()
    try:
        assert sorted(one_per_call.compiled_programs().by_resolution[SQUARE].decode) == [1]
        images = run(one_per_call, request("one-per-call", **asked)).images()
        decodes = [e.detail for e in one_per_call.trace() if e.kind == "decode"]
    finally:
        one_per_call.stop(drain_seconds=10)
    assert [d.split("first=")[1].split()[0] for d in decodes] == ["0", "1", "2"], decodes
    together = run(engine, request("together", **asked)).images()
    assert sorted(images) == sorted(together) == [0, 1, 2]
    for index in range(3):
        assert max_level_difference(images[index], together[index]) <= 1
