"""The static policy (whole batches, the reference recipe's behaviour) and stopping with a drain."""

from __future__ import annotations

import pytest
from engine_helpers import SQUARE, Recorder, make_config, request
from sdxl_server.engine import JaxEngine
from sdxl_server.engine.api import Finished, NotReadyError


@pytest.fixture(scope="module")
def static_engine(tiny_model_dir, compilation_cache_dir):
    config = make_config(
        tiny_model_dir, compilation_cache_dir, policy="static", resolutions=(SQUARE,), steps_per_dispatch=1
    )
    engine = JaxEngine(config)
    engine.start()
    yield engine
    engine.stop()


def trace_of(engine, request_id: str, kind: str):
    return [e for e in engine.trace() if e.request_id == request_id and e.kind == kind]


def test_static_policy_makes_a_new_request_wait_for_the_whole_batch(static_engine):
    joined = Recorder()

    def try_to_join(progress) -> None:
        if progress.completed_steps >= 4 and not joined.events:
            static_engine.submit(request("static-short", seed=2, steps=2), joined)

    long_running = Recorder(on_progress=try_to_join)
    static_engine.submit(request("static-long", seed=1, steps=12), long_running)
    assert isinstance(long_running.wait(), Finished)
    assert isinstance(joined.wait(), Finished)

    (submitted,) = trace_of(static_engine, "static-short", "submit")
    (admitted,) = trace_of(static_engine, "static-short", "admit")
    (long_done,) = trace_of(static_engine, "static-long", "finish")
    assert submitted.boundary < long_done.boundary, "submitted too late to test waiting"
    assert admitted.boundary >= long_done.boundary, "joined a running batch under the static policy"


def test_stop_finishes_accepted_work_then_refuses_new_work(static_engine):
    accepted = [Recorder() for _ in range(5)]  # more images than slots: some are still queued at stop
    for i, recorder in enumerate(accepted):
        static_engine.submit(request(f"drain-{i}", seed=i, steps=3), recorder)
    static_engine.stop(drain_seconds=120)
    assert all(isinstance(r.wait(), Finished) for r in accepted)
    with pytest.raises(NotReadyError):
        static_engine.submit(request("after-stop"), Recorder())
    assert not static_engine.stats().ready
