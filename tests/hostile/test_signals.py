"""SIGTERM and SIGKILL while a real server holds accepted work.

No timing is assumed: a 5000-step request holds the only slot, so the drain provably lasts until the
test cancels it, and what the test does "while draining" cannot race the end of the drain.
"""

from __future__ import annotations

import signal
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2
from hostile_wire import GENERATE, call
from sdxl_client import Client, RetryPolicy, Unavailable
from sdxl_client._proto.sdxl.v1 import sdxl_pb2
from sdxl_test_support.grpc_details import image_stub
from sdxl_test_support.metrics_page import metric_samples, sample

LONG_STEPS = 5000
QUEUED = 3
HOLDER_ARGS = ("--slots-per-device", "1", "--max-queue", "16", "--max-steps", str(LONG_STEPS))


def _metric(server, name: str) -> float:
    return sample(metric_samples(server.scrape_metrics()), name)


def _until(condition, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.02)


def _queue_behind_a_long_request(server, channel):
    """Starts the long request (in the slot) and QUEUED one-step requests behind it, on threads."""
    holder = image_stub(channel).GenerateStream(
        sdxl_pb2.GenerateRequest(prompt="hold the slot", steps=LONG_STEPS)
    )  # no deadline: deadline admission would refuse 5000 steps, which is the point of holding
    assert next(holder).WhichOneof("event") == "queued"
    outcomes: list[object] = []

    def one_request(i: int) -> None:
        with Client(server.target, retry=RetryPolicy(max_attempts=1), timeout=None) as client:
            try:
                outcomes.append(client.generate(f"queued {i}", steps=1))
            except Exception as e:
                outcomes.append(e)

    threads = [threading.Thread(target=one_request, args=(i,)) for i in range(QUEUED)]
    for thread in threads:
        thread.start()
    _until(lambda: _metric(server, "sdxl_queue_depth") == QUEUED, f"{QUEUED} requests are queued")
    return holder, threads, outcomes


@pytest.mark.slow
def test_sigterm_mid_load_keeps_accepted_work_and_answers_late_calls_unavailable(server_factory) -> None:
    server = server_factory(*HOLDER_ARGS, "--drain-seconds", "300")
    with server.channel() as channel:
        holder, threads, outcomes = _queue_behind_a_long_request(server, channel)
        assert _metric(server, "sdxl_ready") == 1
        health = server.health_statuses()
        assert next(health) == health_pb2.HealthCheckResponse.SERVING

        server.process.send_signal(signal.SIGTERM)
        assert next(health) == health_pb2.HealthCheckResponse.NOT_SERVING
        # Draining (the long request holds it open): not ready, and every new call is UNAVAILABLE
        # with a retry delay, from the raw wire and from the client, retries included.
        assert _metric(server, "sdxl_ready") == 0
        body = sdxl_pb2.GenerateRequest(prompt="late", steps=1).SerializeToString()
        late = [call(channel, GENERATE, body) for _ in range(10)]
        assert {o.code for o in late} == {grpc.StatusCode.UNAVAILABLE}
        assert all("shutting down" in o.details and o.retry_delay for o in late)
        retries: list[object] = []
        with Client(
            server.target,
            retry=RetryPolicy(max_attempts=3, max_backoff=0.05),
            on_retry=lambda error, attempt, wait: retries.append(error),
        ) as client:
            try:
                client.generate("late, with retries", steps=1)
            except Unavailable as e:
                assert e.retryable and "shutting down" in e.message
            else:
                raise AssertionError("a call during the drain was served")
        assert len(retries) == 2 and all(isinstance(e, Unavailable) for e in retries)

        holder.cancel()  # the drain can end once the queued requests ran
        for thread in threads:
            thread.join(120)
    assert server.terminate(timeout=120) == 0
    # The requests accepted before the signal all finished, with their image.
    assert len(outcomes) == QUEUED
    assert all(not isinstance(o, Exception) and len(o.images) == 1 for o in outcomes), outcomes
    events = [entry.get("event") for entry in server.log_entries()]
    assert events.index("draining") < events.index("grpc_stopped") < events.index("stopped")


@pytest.mark.slow
def test_sigkill_mid_load_ends_every_call_unavailable_at_once(server_factory) -> None:
    server = server_factory(*HOLDER_ARGS)
    with server.channel() as channel:
        holder, threads, outcomes = _queue_behind_a_long_request(server, channel)
        server.process.kill()
        server.process.wait(60)
        for thread in threads:
            thread.join(60)
            assert not thread.is_alive(), "a call outlived its server by a minute"
        try:
            list(holder)
        except grpc.RpcError as e:
            holder_code = e.code()
    # Unavailable is retryable: behind a balanced target the client moves to another replica.
    assert holder_code == grpc.StatusCode.UNAVAILABLE
    assert len(outcomes) == QUEUED
    assert all(isinstance(o, Unavailable) and o.retryable for o in outcomes), outcomes
