"""The engine's cost follows its work: the step runs the smallest batch bucket that covers the busy
slots, and a decode covers only the images that finished, rounded up to a compiled size.

Asserted on the engine's own trace (what it dispatched), never on time. Pixel equality with the pipeline
for the same situations is in test_engine_oracle.py.
"""

from __future__ import annotations

import threading

from engine_helpers import SQUARE, WAIT_SECONDS, Recorder, bucket_of, request, run, trace_between
from sdxl_server.engine.api import Finished
from sdxl_server.engine.batching.buckets import covering_bucket


def test_a_lone_unguided_request_runs_the_smallest_step_and_decode(engine):
    start = engine.loop_statistics().boundary
    run(engine, request("lone", seed=31, steps=5, guidance_scale=1.0))
    steps = trace_between(engine, start, "step")
    (decode,) = trace_between(engine, start, "decode")
    assert steps and all(bucket_of(e) == 1 and "rows=1" in e.detail for e in steps), [e.detail for e in steps]
    assert bucket_of(decode) == 1 and "images=1" in decode.detail


def test_a_lone_guided_request_runs_two_rows(engine):
    start = engine.loop_statistics().boundary
    run(engine, request("lone-guided", seed=31, steps=3, guidance_scale=5.0))
    steps = trace_between(engine, start, "step")
    assert steps and all(bucket_of(e) == 2 and "rows=2" in e.detail for e in steps), [e.detail for e in steps]


def test_a_guidance_interval_drops_the_step_to_one_row_when_it_ends(engine):
    start = engine.loop_statistics().boundary
    run(engine, request("interval", seed=33, steps=6, guidance_interval=(0.0, 0.5)))
    rows = [int(e.detail.split("rows=")[1].split()[0]) for e in trace_between(engine, start, "step")]
    assert rows[0] == 2 and rows[-1] == 1, rows


def test_a_full_bank_runs_the_largest_step_and_one_decode_for_the_batch(engine):
    slots = engine.config.slots_per_device
    start = engine.loop_statistics().boundary
    # Hold the step loop inside the first image's first Progress until the rest are queued: they all
    # join at the next boundary and, with equal steps, finish at the same one.
    release = threading.Event()
    first = Recorder(on_progress=lambda _: release.wait(WAIT_SECONDS))
    engine.submit(request("full-0", seed=40, steps=6), first)
    while not trace_between(engine, start, "step"):
        release.wait(0.01)  # polls the trace until the first step was dispatched
    others = [Recorder() for _ in range(slots - 1)]
    engine.submit(request("full-rest", seed=41, steps=5, num_images=slots - 1), others[0])
    release.set()
    assert isinstance(first.wait(), Finished) and isinstance(others[0].wait(), Finished)

    steps = trace_between(engine, start, "step")
    assert max(bucket_of(e) for e in steps) == 2 * slots  # every image guided: two rows each
    assert any(f"slots={slots}" in e.detail and bucket_of(e) == 2 * slots for e in steps)
    decodes = trace_between(engine, start, "decode")
    assert sum(int(e.detail.split("images=")[1]) for e in decodes) == slots
    # The two images that finished together were decoded together.
    assert any("images=2" in e.detail and bucket_of(e) == 2 for e in decodes), [e.detail for e in decodes]


def test_every_decode_is_the_finished_count_rounded_up_to_a_bucket(engine):
    """Over everything the shared engine decoded in this session (one device: all images in one block)."""
    buckets = engine.loop_statistics().buckets[SQUARE]
    decodes = [e for e in engine.trace() if e.kind == "decode"]
    assert decodes
    for event in decodes:
        images = int(event.detail.split("images=")[1])
        resolution = event.detail.split()[0]
        assert bucket_of(event, resolution) == covering_bucket(buckets, images), event


def test_the_loop_statistics_count_what_the_trace_shows(engine):
    before = engine.loop_statistics()
    run(engine, request("counted", seed=32, steps=5))
    after = engine.loop_statistics()
    steps = trace_between(engine, before.boundary, "step")
    assert after.boundary - before.boundary == len(steps) > 0
    ks = [int(e.detail.split()[0].removeprefix("k=")) for e in steps]
    assert after.steps_dispatched - before.steps_dispatched == sum(ks) == 5  # a lone request: no overshoot
    assert after.steps_per_dispatch == (1, 2) and set(ks) <= {1, 2}  # the shared engine's K is 2
    assert after.buckets[SQUARE] == (1, 2, 3) and after.programs_compiled > 0
    assert after.row_buckets[SQUARE] == (1, 2, 4, 5, 6)
    assert after.host_seconds >= before.host_seconds
