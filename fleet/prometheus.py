"""A real Prometheus (Debian's package, unpacked by `make debian-tools`) scraping the pods.

Targets come from file-based service discovery: the fleet rewrites ``targets.json`` (atomically) as pods
start and go, which Prometheus notices through inotify, as a PodMonitoring or ServiceMonitor would add a
pod's endpoint. Each target carries the labels the autoscaler's queries select on (``namespace``,
``pod``), and the job is named like the chart's PodMonitoring. Queries go through the HTTP API.
"""

from __future__ import annotations

import asyncio
import json
import os
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from fleet.ports import free_port


class Prometheus:
    def __init__(self, binary: str, work_dir: Path, job: str, namespace: str, scrape_interval: float) -> None:
        self._binary = binary
        self._dir = work_dir
        self.job = job
        self.namespace = namespace
        self.scrape_interval = scrape_interval
        self.port = 0
        self._targets = work_dir / "targets.json"
        self._process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self._dir.mkdir(parents=True, exist_ok=True)
        self.set_targets({})
        interval = f"{max(1, round(self.scrape_interval * 1000))}ms"
        timeout = f"{max(1, round(min(self.scrape_interval, 10.0) * 1000))}ms"
        config = {
            "global": {"scrape_interval": interval, "evaluation_interval": interval},
            "scrape_configs": [
                {
                    "job_name": self.job,
                    "scrape_interval": interval,
                    "scrape_timeout": timeout,
                    "file_sd_configs": [{"files": [str(self._targets)], "refresh_interval": "30s"}],
                }
            ],
        }
        (self._dir / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
        self.port = free_port()
        log = open(self._dir / "prometheus.log", "wb")  # noqa: SIM115 - lives as long as the process
        self._process = await asyncio.create_subprocess_exec(
            self._binary,
            f"--config.file={self._dir / 'prometheus.yml'}",
            f"--storage.tsdb.path={self._dir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--storage.tsdb.retention.time=1d",
            stdout=log,
            stderr=log,
        )
        for _ in range(600):
            if self._process.returncode is not None:
                raise RuntimeError(f"prometheus exited with {self._process.returncode}; see {self._dir}")
            try:
                await asyncio.to_thread(self._get, "/-/ready")
                return
            except OSError:
                await asyncio.sleep(0.1)
        raise RuntimeError("prometheus did not become ready")

    def set_targets(self, pods: dict[str, str]) -> None:
        """``{pod name: "host:port"}``: the pods Prometheus should scrape from now on."""
        groups = [
            {"targets": [address], "labels": {"namespace": self.namespace, "pod": name}}
            for name, address in sorted(pods.items())
        ]
        tmp = self._targets.with_suffix(".tmp")
        tmp.write_text(json.dumps(groups))
        os.replace(tmp, self._targets)

    async def query(self, promql: str) -> list[tuple[dict[str, str], float]]:
        """An instant query: ``[(labels, value), ...]``."""
        body = await asyncio.to_thread(
            self._get, "/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        )
        data = json.loads(body)
        if data.get("status") != "success":
            raise RuntimeError(f"prometheus query failed: {data}")
        return [(r["metric"], float(r["value"][1])) for r in data["data"]["result"]]

    def _get(self, path: str) -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as response:
            body: bytes = response.read()
            return body

    async def stop(self) -> None:
        if self._process is not None and self._process.returncode is None:
            self._process.terminate()
            await self._process.wait()


def pods_metric_query(metric: str, namespace: str, pods: list[str], window_seconds: float) -> str:
    """What prometheus-adapter sends for the chart README's rule: ``metricsQuery:
    avg_over_time(<<.Series>>{<<.LabelMatchers>>}[1m])``, the matchers naming the HPA's pods."""
    pod_regex = "|".join(pods)
    window = f"{max(1, round(window_seconds * 1000))}ms"
    return f'avg_over_time({metric}{{namespace="{namespace}",pod=~"{pod_regex}"}}[{window}])'


def external_metric_query(metric: str, namespace: str, job: str) -> str:
    """The GMP External metric's series: the latest sample of ``sdxl_load`` per pod, selected by
    namespace and job as the chart's selector does (``resource.labels.namespace``/``job``)."""
    return f'{metric}{{namespace="{namespace}",job="{job}"}}'


def to_milli(value: float) -> int:
    """The adapters' ``resource.NewMilliQuantity(int64(value*1000), ...)``: truncated."""
    return int(value * 1000.0)


Labels = dict[str, Any]
