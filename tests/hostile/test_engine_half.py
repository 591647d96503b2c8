"""Hostile inputs the engine half of issue 10 fixed: tight deadlines on a fresh server, huge prompts.

The deadline test has a server of its own (``fresh_server``), which must not have measured any step yet.
"""

from __future__ import annotations

import threading
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hostile_wire import TOKEN, bearer
from sdxl_client._proto.sdxl.v1 import sdxl_pb2
from sdxl_test_support.grpc_details import image_stub

LONG_PROMPT = "🦊" * 16384  # inside the 16,384-character limit, ~65,000 tokens before truncation


def test_a_fresh_server_takes_requests_it_can_finish_in_time(fresh_server) -> None:
    # A 64x64 four-step request takes ~50 ms here, a tenth of its deadline; the estimate before any
    # measured step (a warm-up guess that counted one-time costs said ~0.25 s a step) must not refuse it.
    served = 0
    with fresh_server.channel() as channel:
        stub = image_stub(channel)
        for i in range(20):
            try:
                stub.Generate(sdxl_pb2.GenerateRequest(prompt=f"quick {i}", steps=4), timeout=1.0)
                served += 1
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert served >= 15


def test_long_prompts_do_not_stall_health_checks(hostile_server) -> None:
    latencies: list[float] = []
    done = threading.Event()

    def long_request() -> None:
        with hostile_server.channel() as channel:
            request = sdxl_pb2.GenerateRequest(prompt=LONG_PROMPT, negative_prompt=LONG_PROMPT, steps=1)
            image_stub(channel).Generate(request, metadata=bearer(TOKEN), timeout=300)

    with hostile_server.channel() as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        check(health_pb2.HealthCheckRequest(), timeout=30)
        callers = [threading.Thread(target=long_request) for _ in range(2)]
        for caller in callers:
            caller.start()
        threading.Thread(target=lambda: ([c.join() for c in callers], done.set()), daemon=True).start()
        while not done.is_set():
            started = time.monotonic()
            check(health_pb2.HealthCheckRequest(), timeout=30)
            latencies.append(time.monotonic() - started)
    # The chart's probes time out after 5 s; two callers used to hold the event loop ~4 s.
    assert max(latencies) < 1.0, latencies
