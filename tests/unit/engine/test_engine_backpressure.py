"""The image workers' queue is bounded: when encoding falls behind, the step loop waits for room instead
of piling decoded batches up in memory, counts that wait, and still delivers every image."""

from __future__ import annotations

import threading

from engine_helpers import SQUARE, WAIT_SECONDS, Recorder, make_config, request
from sdxl_server.engine import JaxEngine
from sdxl_server.engine.api import Finished, ImageReady


def test_a_stalled_image_worker_holds_the_step_loop_at_the_bounded_queue(
    tiny_model_dir, compilation_cache_dir
):
    # The static and fatal tests' programs (the queue bounds and workers are not part of them): on a
    # cold machine one module compiles them and the others load them from the compilation cache.
    engine = JaxEngine(
        make_config(
            tiny_model_dir,
            compilation_cache_dir,
            resolutions=(SQUARE,),
            steps_per_dispatch=1,
            max_pending_decodes=1,
            encode_workers=1,
        )
    )
    engine.start()
    try:
        gate = threading.Event()
        stalled = Recorder()

        def stall_on_image(event) -> None:  # runs on the only image worker: it stays busy until `gate`
            if isinstance(event, ImageReady):
                gate.wait(WAIT_SECONDS)
            stalled(event)

        others = [Recorder(), Recorder()]
        # All three share the 3 slots: "stalled" (2 steps) finishes first, then "second" (4 steps);
        # "third" (8 steps) keeps the loop stepping after them.
        engine.submit(request("stalled", seed=1, steps=2), stall_on_image)
        engine.submit(request("second", seed=2, steps=4), others[0])
        engine.submit(request("third", seed=3, steps=8), others[1])

        def decoded(request_id: str) -> bool:
            finished = {e.request_id for e in engine.trace() if e.kind == "finish"}
            decodes = [e for e in engine.trace() if e.kind == "decode"]
            return request_id in finished and len(decodes) >= 2

        while not decoded("second"):
            gate.wait(0.01)  # polls the trace until the second decode was dispatched
        frozen_at = engine.loop_statistics().boundary
        # The one worker is busy with the first image and the queue's one place is taken, so the loop
        # waits in the second decode's hand-off: no boundary passes while the worker stays stalled.
        gate.wait(0.3)
        assert engine.loop_statistics().boundary == frozen_at
        assert not gate.is_set()
        gate.set()

        for recorder in (stalled, *others):
            assert isinstance(recorder.wait(), Finished)
            assert len(recorder.images()) == 1  # nothing dropped
        after = engine.loop_statistics()
        assert after.backpressure_seconds >= 0.25  # the 0.3 s stall, less the hand-off
        assert after.boundary > frozen_at
    finally:
        gate.set()
        engine.stop(drain_seconds=10)
