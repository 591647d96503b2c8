"""A fatal failure marks the engine unhealthy and fails every waiting caller instead of hanging them.

No real device can be made to fail here, so the test replaces the compiled step program with one that
raises, as a dispatch to a broken device does (the one fake in the engine tests).
"""

from __future__ import annotations

import threading

import pytest
from engine_helpers import SQUARE, WAIT_SECONDS, Recorder, make_config, request
from sdxl_server.engine import JaxEngine
from sdxl_server.engine.api import EngineFatalError, Failed, NotReadyError


def broken_step(*args):
    raise RuntimeError("device lost")


def test_a_failed_dispatch_fails_everyone_and_marks_the_engine_unhealthy(
    tiny_model_dir, compilation_cache_dir
):
    # The static test's programs (the policy is not part of them), so they come from the compilation cache.
    config = make_config(tiny_model_dir, compilation_cache_dir, resolutions=(SQUARE,), steps_per_dispatch=1)
    engine = JaxEngine(config)
    engine.start()
    try:
        # Hold the step loop inside the first request's first delivery while the device "breaks" and
        # more requests arrive: one in a slot, the others in slots or queued when the next step fails.
        release = threading.Event()
        first = Recorder(on_progress=lambda progress: release.wait(WAIT_SECONDS))
        engine.submit(request("doomed-first", steps=8), first)
        while not any(e.kind == "step" for e in engine.trace()):
            release.wait(0.01)  # polls the trace until the first step was dispatched
        steps = engine.compiled_programs().by_resolution[SQUARE].steps
        for key in steps:  # every batch bucket: whichever the next boundary picks fails
            steps[key] = broken_step
        others = [Recorder() for _ in range(4)]
        for i, recorder in enumerate(others):
            engine.submit(request(f"doomed-{i}", seed=i), recorder)
        release.set()

        for recorder in [first, *others]:
            end = recorder.wait()
            assert isinstance(end, Failed) and isinstance(end.error, EngineFatalError)
        stats = engine.stats()
        assert not stats.healthy and not stats.ready
        with pytest.raises(NotReadyError):
            engine.submit(request("after-failure"), Recorder())
    finally:
        engine.stop()
