"""The autoscaling signals of a real server: ``sdxl_demand`` sees refused work that ``sdxl_load`` cannot,
and a pod that is not serving reports neither.

``sdxl_load`` = (images waiting + in slots) / slots stops at (max queue + slots) / slots once the queue is
full, however much work is refused; ``sdxl_demand`` counts every validated arrival (service/demand.py), so
a saturated pod that turns most callers away reads the pods' worth of work actually asked for.

How a pod that is not serving enters the HPA's average: it must not report ``sdxl_load`` at all.

The fleet harness showed (docs/AUTOSCALING.md) that Prometheus scrapes a pod from the moment its process
listens, long before it serves: a warming pod reported ``sdxl_load 0``, and for a Pods metric the HPA
counts every running pod with a sample as ready, whatever its Ready condition (upstream ``groupPods``
reads readiness only for CPU). Warming pods at 0 pull the average down, toward a scale-down, while
they cannot take any load. A pod with no sample is "missing" instead: 0 on a scale-up, the target on a
scale-down, which is what the HPA intends for pods whose load is unknown. Same while draining.

A real server held in warm-up (the test-only entry point ``sdxl_test_support.held_warmup``), scraped over
HTTP.
"""

from __future__ import annotations

import math
import uuid
from pathlib import Path

import grpc
from sdxl_client._proto.sdxl.v1 import sdxl_pb2, sdxl_pb2_grpc
from sdxl_test_support.held_warmup import HELD_SERVER_COMMAND
from sdxl_test_support.metrics_page import metric_samples
from sdxl_test_support.servers import DEFAULT_ARGS, RunningServer

from fleet.replica_calculator import PodInfo, PodPhase, get_metric_replicas


def _unlabelled(server: RunningServer) -> dict[str, float]:
    """The server's unlabelled samples by name (``sdxl_ready``, ``sdxl_load``, ...)."""
    return {
        name: value for (name, labels), value in metric_samples(server.scrape_metrics()).items() if not labels
    }


DEMAND_WINDOW_SECONDS = 60.0  # far longer than the test's arrivals take: none leaves the window
LONG_STEPS = 1000


def _generate(steps: int) -> sdxl_pb2.GenerateRequest:
    return sdxl_pb2.GenerateRequest(
        prompt="a red circle", steps=steps, num_images=1, width=64, height=64, request_id=uuid.uuid4().hex
    )


def test_refused_arrivals_raise_demand_above_what_load_can_show() -> None:
    server = RunningServer(
        [*DEFAULT_ARGS, "--resolutions", "64x64", "--max-steps", str(LONG_STEPS), "--max-queue", "1",
         "--slots-per-device", "1", "--demand-window-seconds", str(DEMAND_WINDOW_SECONDS)],
    )  # fmt: skip
    try:
        server.wait_ready()
        channel = server.channel()
        stub = sdxl_pb2_grpc.ImageServiceStub(channel)
        # One long request in every slot, one in the queue: the pod is saturated from here on.
        slots = int(_unlabelled(server)["sdxl_slots_total"])
        running = [stub.GenerateStream(_generate(LONG_STEPS)) for _ in range(slots)]
        for stream in running:  # each has run steps: the engine has measured its step time
            next(e for e in stream if e.HasField("progress") and e.progress.completed_steps >= 3)
        running.append(stub.GenerateStream(_generate(LONG_STEPS)))
        next(e for e in running[-1] if e.HasField("queued"))
        page = _unlabelled(server)
        ceiling = (1 + slots) / slots  # (max queue + slots) / slots: the most sdxl_load can show
        assert page["sdxl_load"] == ceiling
        admitted_only = page["sdxl_demand"]
        # Enough refused arrivals for 3x the ceiling, at the step time the engine reports.
        step_seconds = page["sdxl_step_duration_seconds_sum"] / page["sdxl_step_duration_seconds_count"]
        per_arrival = LONG_STEPS * step_seconds / DEMAND_WINDOW_SECONDS / slots
        refused = 0
        for _ in range(math.ceil(3 * ceiling / per_arrival)):
            try:
                # A deadline far beyond the 1000 steps: a short one is refused as unreachable (also a
                # refusal demand counts) on a slow machine, before the queue check this test is about.
                stub.Generate(_generate(LONG_STEPS), timeout=3600)
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                refused += 1
        page = _unlabelled(server)
        assert refused >= 1
        assert page["sdxl_load"] <= ceiling
        # Counted at the full batch's step time (here one slot per device: the recent one), which differs
        # a little from the histogram's mean: 3x the ceiling asked for, more than 1.5x it read.
        assert page["sdxl_demand"] > max(1.5 * ceiling, admitted_only)
        for stream in running:
            stream.cancel()
        channel.close()
    finally:
        server.kill()


def test_a_warming_server_reports_no_load_until_it_serves(tmp_path: Path) -> None:
    go = tmp_path / "go"
    server = RunningServer(
        ["--model", "tiny", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0",
         "--resolutions", "64x64", "--hold-warmup-until-file", str(go)],
        command=HELD_SERVER_COMMAND,
    )  # fmt: skip
    try:
        warming = _unlabelled(server)
        assert warming["sdxl_ready"] == 0
        assert "sdxl_load" not in warming
        assert "sdxl_demand" not in warming
        go.touch()
        server.wait_ready(timeout=300)
        serving = _unlabelled(server)
        assert serving["sdxl_load"] == 0.0
        assert serving["sdxl_demand"] == 0.0
    finally:
        server.kill()


def test_a_missing_sample_holds_a_scale_down_where_a_zero_would_push_it() -> None:
    # Two serving pods just under the target (0.7 of 0.8), one pod warming up: with a 0 sample the
    # average drops to 0.47 and the HPA proposes 2 (and would delete the warming pod first); with no
    # sample it counts the warming pod at the target and keeps 3.
    pods = [PodInfo(f"p{i}", PodPhase.RUNNING, ready=i < 2) for i in range(3)]
    assert get_metric_replicas(3, 800, {"p0": 700, "p1": 700, "p2": 0}, pods)[0] == 2
    assert get_metric_replicas(3, 800, {"p0": 700, "p1": 700}, pods)[0] == 3
