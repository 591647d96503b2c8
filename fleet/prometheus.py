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
    def __init__(
        self,
        binary: str,
        work_dir: Path,
        job: str,
        namespace: str,
        scrape_interval: float,
        rule_groups: tuple[dict[str, Any], ...] = (),
    ) -> None:
        """``rule_groups``: recording and alerting rule groups to evaluate (the chart's, time-compressed)."""
        self._rule_groups = rule_groups
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
        if self._rule_groups:
            rules = self._dir / "rules.yml"
            rules.write_text(json.dumps({"groups": list(self._rule_groups)}))  # JSON is YAML
            config["rule_files"] = [str(rules)]
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
    """What prometheus-adapter sends for the chart README's rules, the matchers naming the HPA's pods:
    ``avg_over_time(<<.Series>>{<<.LabelMatchers>>}[1m])`` for ``sdxl_load``, the latest sample
    (``window_seconds`` 0) for ``sdxl_demand``."""
    pod_regex = "|".join(pods)
    series = f'{metric}{{namespace="{namespace}",pod=~"{pod_regex}"}}'
    if window_seconds <= 0:  # the rule for sdxl_demand: its latest sample (the server already averages)
        return series
    window = f"{max(1, round(window_seconds * 1000))}ms"
    return f"avg_over_time({series}[{window}])"


def external_metric_query(metric: str, namespace: str, job: str) -> str:
    """An External metric's series: the latest sample of ``metric`` (one per pod, or the one recorded
    ``sdxl_demand_with_headroom``), selected by namespace and job as the chart's selector does
    (GMP's ``resource.labels.namespace``/``job``; prometheus-adapter's ``job`` within the namespace)."""
    return f'{metric}{{namespace="{namespace}",job="{job}"}}'


def to_milli(value: float) -> int:
    """The adapters' ``resource.NewMilliQuantity(int64(value*1000), ...)``: truncated."""
    return int(value * 1000.0)


Labels = dict[str, Any]
