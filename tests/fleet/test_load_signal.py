"""How a pod that is not serving enters the HPA's average: it must not report ``sdxl_load`` at all.

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

from pathlib import Path

from sdxl_test_support.held_warmup import HELD_SERVER_COMMAND
from sdxl_test_support.metrics_page import metric_samples
from sdxl_test_support.servers import RunningServer

from fleet.replica_calculator import PodInfo, PodPhase, get_metric_replicas


def _unlabelled(server: RunningServer) -> dict[str, float]:
    """The server's unlabelled samples by name (``sdxl_ready``, ``sdxl_load``, ...)."""
    return {
        name: value for (name, labels), value in metric_samples(server.scrape_metrics()).items() if not labels
    }


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
        go.touch()
        server.wait_ready(timeout=300)
        assert _unlabelled(server)["sdxl_load"] == 0.0
    finally:
        server.kill()


def test_a_missing_sample_holds_a_scale_down_where_a_zero_would_push_it() -> None:
    # Two serving pods just under the target (0.7 of 0.8), one pod warming up: with a 0 sample the
    # average drops to 0.47 and the HPA proposes 2 (and would delete the warming pod first); with no
    # sample it counts the warming pod at the target and keeps 3.
    pods = [PodInfo(f"p{i}", PodPhase.RUNNING, ready=i < 2) for i in range(3)]
    assert get_metric_replicas(3, 800, {"p0": 700, "p1": 700, "p2": 0}, pods)[0] == 2
    assert get_metric_replicas(3, 800, {"p0": 700, "p1": 700}, pods)[0] == 3
