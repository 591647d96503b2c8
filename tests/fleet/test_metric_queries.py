"""The autoscaler's two ways of reading ``sdxl_load`` through a real Prometheus (Debian's, file-based
discovery), with the HPA port on top: the Pods metric through the prometheus-adapter rule's query, and
the GMP External metric's series. The scraped targets are two tiny HTTP exporters serving fixed
``sdxl_load`` values (what is tested is the query and discovery path, not the server), each on its own
loopback address like the fleet's pods. About 10 s (Prometheus start, discovery, 0.2 s scrapes).
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from fleet.prometheus import Prometheus, external_metric_query, pods_metric_query, to_milli
from fleet.replica_calculator import (
    PodInfo,
    PodPhase,
    get_external_per_pod_metric_replicas,
    get_metric_replicas,
)

REPO = Path(__file__).resolve().parents[2]
LOADS = {"sdxl-serve-2": ("127.0.0.30", 2.0), "sdxl-serve-3": ("127.0.0.31", 0.5)}


def _exporter(address: str, load: float) -> ThreadingHTTPServer:
    body = f"# TYPE sdxl_load gauge\nsdxl_load {load}\n".encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer((address, 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def exporters() -> Iterator[dict[str, str]]:
    servers = {name: _exporter(address, load) for name, (address, load) in LOADS.items()}
    yield {name: f"{LOADS[name][0]}:{s.server_port}" for name, s in servers.items()}
    for s in servers.values():
        s.shutdown()
        s.server_close()


async def _until(query, predicate, prometheus: Prometheus):  # type: ignore[no-untyped-def]
    for _ in range(300):
        result = await prometheus.query(query)
        if predicate(result):
            return result
        await asyncio.sleep(0.1)
    raise AssertionError(f"prometheus never satisfied the check for {query}: last {result}")


def test_pods_and_external_metrics_through_prometheus(exporters: dict[str, str], tmp_path: Path) -> None:
    binary = os.environ.get("SDXL_PROMETHEUS") or str(REPO / ".tools" / "debian" / "bin" / "prometheus")
    assert os.access(binary, os.X_OK), f"prometheus missing at {binary}: `make debian-tools` installs it"

    async def scenario() -> None:
        prometheus = Prometheus(binary, tmp_path, "sdxl-serve", "fleet", scrape_interval=0.2)
        await prometheus.start()
        try:
            prometheus.set_targets(exporters)
            pods = [PodInfo(name, PodPhase.RUNNING) for name in exporters]
            adapter = pods_metric_query("sdxl_load", "fleet", list(exporters), window_seconds=2.0)
            result = await _until(adapter, lambda r: len(r) == 2, prometheus)
            metrics = {labels["pod"]: to_milli(value) for labels, value in result}
            assert metrics == {"sdxl-serve-2": 2000, "sdxl-serve-3": 500}
            # Pods metric: average 1.25 against 0.8 -> ceil(1.5625 * 2) = 4.
            assert get_metric_replicas(2, 800, metrics, pods) == (4, 1250)
            external = external_metric_query("sdxl_load", "fleet", "sdxl-serve")
            series = [to_milli(v) for _, v in await _until(external, lambda r: len(r) == 2, prometheus)]
            # External AverageValue: sum 2.5 over status replicas 2 -> ceil(2.5 / 0.8) = 4.
            assert get_external_per_pod_metric_replicas(2, 800, series) == (4, 1250)
            # A pod leaving discovery leaves the External sum at once (a staleness marker), so the sum
            # no longer counts a pod the replica count no longer does.
            prometheus.set_targets({"sdxl-serve-3": exporters["sdxl-serve-3"]})
            remaining = await _until(external, lambda r: len(r) == 1, prometheus)
            assert remaining[0][0]["pod"] == "sdxl-serve-3"
        finally:
            await prometheus.stop()

    asyncio.run(scenario())
