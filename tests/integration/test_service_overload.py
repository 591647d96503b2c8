"""Admission control on a real server with one slot and a one-image queue.

States are built from events, not from timing: a long request (thousands of steps) is known to hold the
only slot once its first progress event arrives, and a second one is known to wait once it is queued.
The long request never finishes on its own; each test cancels what it started and waits for the server
to be idle again (observed on /metrics).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import grpc
import pytest
from sdxl_client._proto.sdxl.v1 import sdxl_pb2
from sdxl_test_support.grpc_details import image_stub, retry_delay_seconds
from sdxl_test_support.metrics_page import metric_samples, sample
from sdxl_test_support.xla_flags import xla_flags

LONG_STEPS = 5000


@pytest.fixture(scope="module")
def server(module_server_factory):
    # One device, one slot, one queued image: easy to fill, deterministic to reason about.
    return module_server_factory(
        "--slots-per-device", "1", "--max-queue", "1", "--max-steps", str(LONG_STEPS),
        env={"XLA_FLAGS": xla_flags(devices=1)},
    )  # fmt: skip


@pytest.fixture
def stub(server):
    with server.channel() as channel:
        yield image_stub(channel)
    _wait_until_idle(server)


def _wait_until_idle(server, timeout: float = 60.0) -> None:
    """Polls /metrics until nothing waits or runs (cancelled work leaves at the next step boundary)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        samples = metric_samples(server.scrape_metrics())
        if sample(samples, "sdxl_queue_depth") == 0 and sample(samples, "sdxl_slots_busy") == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"server still busy after {timeout}s")


@contextlib.contextmanager
def _running_long_request(stub) -> Iterator[Iterator[sdxl_pb2.GenerateEvent]]:
    # No deadline: on a slow device 5000 steps could take longer than any deadline we would pick, and
    # deadline-aware admission would (rightly) refuse it. The test cancels it; pytest-timeout bounds it.
    stream = stub.GenerateStream(sdxl_pb2.GenerateRequest(prompt="long", steps=LONG_STEPS))
    try:
        assert next(stream).WhichOneof("event") == "queued"
        assert next(stream).WhichOneof("event") == "progress"  # it holds the only slot now
        yield stream
    finally:
        stream.cancel()


@contextlib.contextmanager
def _queued_request(stub, steps: int = 1) -> Iterator[Iterator[sdxl_pb2.GenerateEvent]]:
    stream = stub.GenerateStream(sdxl_pb2.GenerateRequest(prompt="waiting", steps=steps))  # behind it
    try:
        first = next(stream)
        assert first.WhichOneof("event") == "queued" and first.queued.position == 0
        yield stream
    finally:
        stream.cancel()


def test_server_has_one_slot(stub) -> None:
    info = stub.GetServerInfo(sdxl_pb2.GetServerInfoRequest(), timeout=30)
    assert (info.slots, info.max_queue) == (1, 1)


def test_full_queue_rejects_at_once_with_retry_info_while_accepted_work_continues(stub) -> None:
    with _running_long_request(stub) as running, _queued_request(stub):
        for _ in range(3):
            with pytest.raises(grpc.RpcError) as caught:
                stub.Generate(sdxl_pb2.GenerateRequest(prompt="one too many", steps=1), timeout=30)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert retry_delay_seconds(caught.value) > 0
        # The rejections did not disturb the accepted work: it keeps making progress.
        progress = [next(running).progress.completed_steps for _ in range(3)]
        assert progress == sorted(progress) and progress[-1] > 1


def test_load_reflects_waiting_and_running_work(server, stub) -> None:
    idle = metric_samples(server.scrape_metrics())
    assert sample(idle, "sdxl_load") == 0
    with _running_long_request(stub):
        running_only = metric_samples(server.scrape_metrics())
        with _queued_request(stub):
            full = metric_samples(server.scrape_metrics())
    assert (sample(running_only, "sdxl_slots_busy"), sample(running_only, "sdxl_load")) == (1, 1.0)
    assert sample(full, "sdxl_queue_depth") == 1
    assert sample(full, "sdxl_load") == 2.0  # (1 waiting + 1 running) / 1 slot


def test_cancelling_a_request_frees_its_slot_for_waiting_work(server, stub) -> None:
    before = metric_samples(server.scrape_metrics())
    with _running_long_request(stub) as running, _queued_request(stub) as waiting:
        running.cancel()
        events = [event.WhichOneof("event") for event in waiting]  # runs to the end in the freed slot
        assert events[-1] == "done" and "image" in events
    after = metric_samples(server.scrape_metrics())
    cancelled = sample(after, "sdxl_requests_total", method="GenerateStream", code="CANCELLED") - sample(
        before, "sdxl_requests_total", method="GenerateStream", code="CANCELLED"
    )
    assert cancelled == 1


@pytest.mark.parametrize(
    ("steps", "reason"),
    [
        (LONG_STEPS, "even on an idle server"),  # its own steps alone take longer than the deadline
        (1, "queue"),  # quick, but the long request ahead of it would make it late
    ],
)
def test_a_request_that_cannot_meet_its_deadline_is_rejected_before_reaching_the_device(
    server, stub, steps, reason
) -> None:
    with _running_long_request(stub):
        before = metric_samples(server.scrape_metrics())
        with pytest.raises(grpc.RpcError) as caught:
            stub.Generate(sdxl_pb2.GenerateRequest(prompt="in a hurry", steps=steps), timeout=3)
        after = metric_samples(server.scrape_metrics())
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "not started" in caught.value.details() and reason in caught.value.details()
    assert sample(after, "sdxl_queue_depth") == 0  # it never took a queue place
    moved = sample(after, "sdxl_requests_total", method="Generate", code="DEADLINE_EXCEEDED") - sample(
        before, "sdxl_requests_total", method="Generate", code="DEADLINE_EXCEEDED"
    )
    assert moved == 1
