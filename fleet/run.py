"""Runs one fleet scenario end to end and writes its report (JSON + PNG).

    .venv/bin/python -m fleet.run [--scenario fleet/scenarios/standard.yaml] [--out DIR]

Order: render the chart (the HPA, the pods' timings); start dnsmasq and Prometheus; start the
``minReplicas`` pods and wait until they are ready; measure one pod's capacity (closed loop) unless the
scenario gives it; then the traffic profile, the HPA loop and the observer run together; after the
profile, the traffic drains and the fleet may keep scaling down for ``settle_seconds``; then every pod is
deleted gracefully and everything is stopped. See docs/AUTOSCALING.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from sdxl_client import SdxlError
from sdxl_client.aio import AsyncClient

from fleet import chart, report
from fleet.dns import Dns
from fleet.fleet import Autoscaler, Fleet, grpc_target
from fleet.pods import PodSettings, make_cgroup_parent, remove_cgroup_parent
from fleet.prometheus import Prometheus
from fleet.scenario import LiveProfile, Scenario, load
from fleet.traffic import Traffic

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SCENARIO = REPO / "fleet" / "scenarios" / "standard.yaml"
DEFAULT_OUT = REPO / "bench" / "results" / "autoscale"
# The adapter rule in the chart README averages over [1m].
ADAPTER_WINDOW_SECONDS = 60.0
READY_TIMEOUT_SECONDS = 600.0


def _tool(variable: str, fallback: str) -> str:
    path = os.environ.get(variable) or str(REPO / ".tools" / "debian" / "bin" / fallback)
    if not os.access(path, os.X_OK):
        raise SystemExit(f"{fallback} not found at {path}: run `make debian-tools` or set {variable}")
    return path


def chart_values(scenario: Scenario) -> dict[str, Any]:
    values = json.loads(json.dumps(scenario.chart_values))
    if scenario.metric == "pods":
        values.setdefault("metrics", {})["backend"] = "prometheus-adapter"
    return values


async def run(scenario: Scenario, out_dir: Path, work_dir: Path) -> dict[str, Any]:
    rendered = chart.load(chart_values(scenario))
    timings, ts = rendered.pods, scenario.time_scale
    dns = Dns(
        _tool("SDXL_DNSMASQ", "dnsmasq"),
        work_dir / "dns",
        f"{rendered.hpa.name}-headless.fleet.svc.cluster.local",
    )
    prometheus = Prometheus(
        _tool("SDXL_PROMETHEUS", "prometheus"), work_dir / "prometheus", rendered.hpa.name, chart.NAMESPACE,
        timings.scrape_interval * ts, _compressed(rendered.rule_groups, ts),
    )  # fmt: skip
    server_args = (
        "--model", scenario.model,
        "--resolutions", scenario.resolution,
        "--default-steps", str(scenario.steps),
        "--max-steps", str(max(scenario.steps, 8)),
        "--slots-per-device", str(scenario.slots_per_device),
        "--max-queue", str(scenario.max_queue),
        "--drain-seconds", f"{timings.drain_seconds * ts:g}",
        "--max-connection-age-seconds", f"{timings.max_connection_age_seconds * ts:g}",
        "--demand-window-seconds", f"{scenario.demand_window_seconds:g}",
        *scenario.server_args,
    )  # fmt: skip
    (work_dir / "pods").mkdir(parents=True, exist_ok=True)
    settings = PodSettings(
        server_args=server_args,
        cpu_limit=scenario.cpu_limit,
        provisioning_delay=scenario.provisioning_delay_seconds,
        startup_period=timings.startup_period * ts,
        readiness_period=timings.readiness_period * ts,
        readiness_failure_threshold=timings.readiness_failure_threshold,
        pre_stop_sleep=timings.pre_stop_sleep * ts,
        termination_grace=timings.termination_grace * ts,
        shared_compilation_cache=None if timings.per_pod_compilation_cache else _shared_cache(),
        log_dir=work_dir / "pods",
    )
    base = time.monotonic()
    offset = {"traffic": 0.0}

    def clock() -> float:  # seconds since the traffic started (negative before)
        return time.monotonic() - base - offset["traffic"]

    cgroup_parent = make_cgroup_parent(f"{os.getpid()}") if scenario.cpu_limit is not None else None
    fleet = Fleet(settings, dns, prometheus, clock, cgroup_parent, rendered.spare_nodes)
    autoscaler = Autoscaler(
        rendered.hpa, fleet, prometheus, scenario.sync_period_seconds * ts,
        ADAPTER_WINDOW_SECONDS * ts, ts, clock,
    )  # fmt: skip
    await dns.start()
    await prometheus.start()
    traffic: Traffic | None = None
    try:
        # The first pods were placed before the run: they do not take the chart's spare nodes.
        spares, fleet.spares_ready = fleet.spares_ready, 0
        fleet.scale(max(1, rendered.hpa.min_replicas))
        fleet.spares_ready = spares
        await _wait_ready(fleet, len(fleet.active()), READY_TIMEOUT_SECONDS)
        target = grpc_target(dns)
        request = {"prompt": "a lighthouse at dusk", "steps": scenario.steps, **_size(scenario.resolution)}
        capacity = scenario.capacity_per_pod or await _measure_capacity(
            target, request, scenario.slots_per_device * 2, scenario.calibrate_seconds
        )
        if scenario.capacity_per_pod is None:
            # Let the calibration's load leave the adapter's averaging window before the HPA reads it.
            await asyncio.sleep(ADAPTER_WINDOW_SECONDS * ts + 2 * prometheus.scrape_interval)
        per_unit = capacity if scenario.rate_unit == "pod_capacity" else 1.0
        profile = LiveProfile(scenario.profile, lambda: len(fleet.ready()))
        traffic = Traffic(
            target, scenario.callers, scenario.deadline_seconds, scenario.max_attempts,
            scenario.retry_budget, request, profile, per_unit,
        )  # fmt: skip
        offset["traffic"] = time.monotonic() - base
        _rebase(fleet, offset["traffic"])
        stop = asyncio.Event()
        loops = [
            asyncio.ensure_future(autoscaler.run(stop)),
            asyncio.ensure_future(autoscaler.observe(stop, max(0.5, prometheus.scrape_interval))),
            asyncio.ensure_future(_kills(scenario, fleet, clock)),
        ]
        await traffic.run(start=base + offset["traffic"])
        await traffic.drain(scenario.deadline_seconds + 5.0)
        await _settle(scenario, fleet, rendered.hpa.min_replicas)
        stop.set()
        await asyncio.gather(*loops)
        result = report.build(scenario, profile, rendered, fleet, autoscaler, traffic.log, capacity, clock())
    finally:
        if traffic is not None:
            await traffic.close()
        await fleet.wait_all_gone()
        await prometheus.stop()
        await dns.stop()
        remove_cgroup_parent(cgroup_parent)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(result, indent=2) + "\n")
    report.plot(result, out_dir / "report.png")
    return result


def _compressed(groups: tuple[dict[str, Any], ...], time_scale: float) -> tuple[dict[str, Any], ...]:
    """The chart's rule groups with their evaluation intervals compressed as the scrape interval is."""
    return tuple(
        {**g, "interval": f"{max(1, round(chart.parse_duration(g['interval']) * time_scale * 1000))}ms"}
        if "interval" in g
        else g
        for g in groups
    )


def _shared_cache() -> Path:
    """The machine's compilation cache (the Makefile's SDXL_COMPILATION_CACHE_DIR) stands for the
    chart's shared cache bucket: a pod that finds its programs there loads them instead of compiling."""
    path = Path(os.environ.get("SDXL_COMPILATION_CACHE_DIR") or REPO / ".cache" / "jax-compilation-cache")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _rebase(fleet: Fleet, shift: float) -> None:
    """Times recorded before the traffic started were counted from the harness start: move them."""
    for pod in fleet.pods:
        r = pod.record
        r.created -= shift
        r.started = [t - shift for t in r.started]
        r.serving = [t - shift for t in r.serving]
        r.ready = [t - shift for t in r.ready]


def _size(resolution: str) -> dict[str, int]:
    width, height = (int(v) for v in resolution.lower().split("x"))
    return {"width": width, "height": height}


async def _wait_ready(fleet: Fleet, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while len(fleet.ready()) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{count} pods not ready after {timeout:.0f} s; see the pod logs")
        await asyncio.sleep(0.1)


async def _measure_capacity(target: str, request: dict[str, Any], concurrency: int, seconds: float) -> float:
    """Requests per second one pod sustains, closed loop (the first and only pod is serving)."""
    done = 0
    end = time.monotonic() + seconds
    async with AsyncClient(target, timeout=30.0) as client:
        await client.wait_until_serving(60.0)  # through DNS: dnsmasq re-reads its hosts file asynchronously

        async def worker() -> None:
            nonlocal done
            while time.monotonic() < end:
                with contextlib.suppress(SdxlError):
                    await client.generate(**request)
                    done += 1

        start = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return done / (time.monotonic() - start)


async def _kills(scenario: Scenario, fleet: Fleet, clock: Any) -> None:
    for kill in sorted(scenario.kills, key=lambda k: k.at):
        while clock() < kill.at:
            await asyncio.sleep(0.05)
        ready = sorted(fleet.ready(), key=lambda p: p.record.ready[-1])
        if ready:
            (ready[0] if kill.pod == "oldest_ready" else ready[-1]).kill()


async def _settle(scenario: Scenario, fleet: Fleet, min_replicas: int) -> None:
    """Lets the HPA keep scaling down after the traffic, until minReplicas or settle_seconds."""
    end = time.monotonic() + scenario.settle_seconds
    while time.monotonic() < end and (len(fleet.pods) > max(1, min_replicas)):
        await asyncio.sleep(0.2)


def with_chart_values(scenario: Scenario, assignments: list[str]) -> Scenario:
    """The scenario with ``KEY=VALUE`` chart values set (dotted keys, YAML values), named after them."""
    if not assignments:
        return scenario
    values = json.loads(json.dumps(scenario.chart_values))
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set {assignment!r}: expected KEY=VALUE")
        node = values
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(text)
    name = scenario.name + " " + " ".join(assignments)
    return dataclasses.replace(scenario, chart_values=values, name=name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenario", type=Path, default=DEFAULT_SCENARIO)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--keep-work-dir", action="store_true", help="keep pod, DNS and Prometheus logs")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a chart value over the scenario's chart_values, e.g. autoscaling.targetLoad=1.0 (YAML value)",
    )
    args = parser.parse_args(argv)
    scenario = with_chart_values(load(args.scenario), args.set)
    # As the Makefile exports it: pods share one tiny model on disk instead of each building its own.
    os.environ.setdefault("SDXL_TINY_MODEL_DIR", str(REPO / ".cache" / "tiny-sdxl"))
    work_dir = Path(tempfile.mkdtemp(prefix="sdxl-fleet-"))
    try:
        result = asyncio.run(run(scenario, args.out, work_dir))
    finally:
        if not args.keep_work_dir:
            shutil.rmtree(work_dir, ignore_errors=True)
        else:
            print(f"work directory kept: {work_dir}", file=sys.stderr)
    print(report.format_summary(result))
    print(f"wrote {args.out / 'report.json'} and {args.out / 'report.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
