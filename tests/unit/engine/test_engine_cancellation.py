"""Cancellation and deadlines free slots at the next step boundary; an expired queued request never runs.

Deadlines are measured on the shared engine's ManualClock: a test moves time forward from inside a
Progress delivery, so a deadline passes at a known point of the run, not after some sleep.
"""

from __future__ import annotations

import threading

import pytest
from engine_helpers import WAIT_SECONDS, Recorder, request
from sdxl_server.engine.api import (
    CancelledError,
    DeadlineUnreachableError,
    Failed,
    Finished,
    InvalidRequestError,
    QueueFullError,
    Resolution,
)

LONG = 50  # steps: the engine's maximum, so nothing finishes before the test acts


def trace_of(engine, request_id: str, kind: str):
    return [e for e in engine.trace() if e.request_id == request_id and e.kind == kind]


def failure(recorder: Recorder):
    end = recorder.wait()
    assert isinstance(end, Failed), end
    return end.error


def test_cancel_frees_the_slot_for_a_waiting_request(engine):
    tickets = {}

    def cancel_a(progress) -> None:
        # Once b and c hold the other slots and the last request waits, so a's slot is the only way in.
        everyone_placed = trace_of(engine, "cancel-b", "admit") and trace_of(engine, "cancel-c", "admit")
        if everyone_placed and trace_of(engine, "cancel-waiting", "submit") and "a" in tickets:
            engine.cancel(tickets.pop("a"))

    a, b, c, waiting = Recorder(on_progress=cancel_a), Recorder(), Recorder(), Recorder()
    tickets["a"] = engine.submit(request("cancel-a", seed=1, steps=LONG), a)
    ticket_b = engine.submit(request("cancel-b", seed=2, steps=LONG), b)
    ticket_c = engine.submit(request("cancel-c", seed=3, steps=LONG), c)
    engine.submit(request("cancel-waiting", seed=4, steps=2), waiting)

    assert isinstance(failure(a), CancelledError)
    assert isinstance(waiting.wait(), Finished)
    (cancelled,) = trace_of(engine, "cancel-a", "cancel")
    (admitted,) = trace_of(engine, "cancel-waiting", "admit")
    # It enters at the boundary that freed a's slot; the busy slots are packed first, so it takes the
    # last position of the block (b and c moved down), not necessarily a's old index.
    assert admitted.boundary == cancelled.boundary
    assert admitted.slot == engine.config.slots_per_device - 1
    assert not trace_of(engine, "cancel-a", "finish")
    for ticket, recorder in ((ticket_b, b), (ticket_c, c)):
        engine.cancel(ticket)
        assert isinstance(failure(recorder), CancelledError)


def test_a_deadline_passing_mid_way_frees_the_slot(engine, engine_clock):
    advanced = []

    def time_runs_out(progress) -> None:
        if progress.completed_steps >= 3 and not advanced:
            advanced.append(True)
            engine_clock.advance(1200)

    late = Recorder(on_progress=time_runs_out)
    engine.submit(request("late", steps=LONG, deadline=engine_clock() + 600), late)
    assert isinstance(failure(late), DeadlineUnreachableError)
    (expired,) = trace_of(engine, "late", "expire")
    assert expired.slot >= 0 and not trace_of(engine, "late", "finish")
    after = Recorder()
    engine.submit(request("after-late", steps=2), after)
    assert isinstance(after.wait(), Finished)


def test_a_queued_request_past_its_deadline_never_reaches_the_device(engine, engine_clock):
    advanced = []

    def time_runs_out(progress) -> None:
        # Once every slot is taken and the request with a deadline waits in the queue.
        fillers_placed = all(trace_of(engine, f"filler-{i}", "admit") for i in range(3))
        if fillers_placed and trace_of(engine, "expired-in-queue", "submit") and not advanced:
            advanced.append(True)
            engine_clock.advance(1200)

    fillers = [Recorder(on_progress=time_runs_out) for _ in range(3)]
    tickets = [engine.submit(request(f"filler-{i}", seed=i, steps=LONG), r) for i, r in enumerate(fillers)]
    queued = Recorder()
    engine.submit(request("expired-in-queue", steps=2, deadline=engine_clock() + 600), queued)

    assert isinstance(failure(queued), DeadlineUnreachableError)
    assert not trace_of(engine, "expired-in-queue", "admit")
    (expired,) = trace_of(engine, "expired-in-queue", "expire")
    assert expired.slot == -1
    for ticket, recorder in zip(tickets, fillers, strict=True):
        engine.cancel(ticket)
        recorder.wait()


def test_submit_rejects_at_once(engine, engine_clock):
    with pytest.raises(DeadlineUnreachableError):
        engine.submit(request("past", deadline=engine_clock() - 1), Recorder())
    bad = {
        "steps": dict(steps=0),
        "num_images": dict(num_images=5),
        "guidance_scale": dict(guidance_scale=float("nan")),
        "width": dict(resolution=Resolution(96, 96)),  # 96 is no served width (64x64 and 128x64 are)
        "height": dict(resolution=Resolution(64, 128)),
        "seed": dict(seed=-1),
    }
    for field, overrides in bad.items():
        with pytest.raises(InvalidRequestError) as caught:
            engine.submit(request(f"bad-{field}", **overrides), Recorder())
        assert caught.value.field == field


def test_a_full_queue_rejects_with_a_retry_delay_and_keeps_what_it_accepted(engine):
    # Hold the step loop inside a delivery, so that nothing leaves the queue while the test fills it.
    release = threading.Event()
    holder = Recorder(on_progress=lambda progress: release.wait(WAIT_SECONDS))
    engine.submit(request("holder", steps=2), holder)
    while not trace_of(engine, "holder", "admit"):
        release.wait(0.01)  # polls the trace; the holder is admitted within a boundary
    accepted = []
    try:
        with pytest.raises(QueueFullError) as caught:
            for i in range(5):  # the queue holds 16 images: the fifth request of four does not fit
                recorder = Recorder()
                engine.submit(request(f"queued-{i}", seed=i, num_images=4, steps=1), recorder)
                accepted.append(recorder)
    finally:
        release.set()
    assert len(accepted) == 4 and caught.value.retry_after_seconds > 0
    assert isinstance(holder.wait(), Finished)
    for recorder in accepted:
        assert isinstance(recorder.wait(), Finished)
        assert len(recorder.images()) == 4
