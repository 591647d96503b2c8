"""A fleet scenario: a YAML file (schema in docs/AUTOSCALING.md). Every error names the field.

Times in the traffic profile, the provisioning delay and the pod's own warm-up are real seconds.
``time_scale`` compresses every duration that comes from the chart or the HPA controller (sync period,
stabilization windows, policy periods, probe periods, preStop sleep, termination grace, drain, connection
age, scrape interval, the adapter's averaging window) by that factor, so that a scenario can show ten
minutes of the chart's scale-down behaviour in one; 1 means real time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from sdxl_client import RetryBudget

# The server's --demand-window-seconds default, and the floor a compressed scenario's window keeps.
DEMAND_WINDOW_SECONDS = 10.0
MIN_DEMAND_WINDOW_SECONDS = 1.0


class ScenarioError(ValueError):
    pass


@dataclass(frozen=True)
class Segment:
    """One piece of the traffic profile: a constant rate, or a linear ramp from ``rate`` to ``rate_to``.

    With ``until_ready`` the segment lasts at least ``seconds`` and then until that many pods are ready
    (at most ``max_seconds``); with ``until_ready_at_most``, until no more than that many are (a pod
    deleted by a scale-down stops counting at once): an event, not a time, so that a slow machine
    lengthens the run instead of failing it.
    """

    seconds: float
    rate: float
    rate_to: float | None = None
    mark: str | None = None  # names the segment's start for the report: "step", "scale_down"
    until_ready: int | None = None
    until_ready_at_most: int | None = None
    max_seconds: float | None = None

    @property
    def waits_for_an_event(self) -> bool:
        return self.until_ready is not None or self.until_ready_at_most is not None

    def waiting(self, ready: int) -> bool:
        """Whether the segment's event has yet to happen with ``ready`` pods ready."""
        if self.until_ready is not None and ready < self.until_ready:
            return True
        return self.until_ready_at_most is not None and ready > self.until_ready_at_most

    def rate_at(self, t: float) -> float:
        if self.rate_to is None:
            return self.rate
        return self.rate + (self.rate_to - self.rate) * min(1.0, max(0.0, t / self.seconds))


@dataclass(frozen=True)
class Kill:
    at: float  # seconds since the traffic started
    pod: str = "oldest_ready"  # or "newest_ready"


@dataclass(frozen=True)
class Scenario:
    name: str
    time_scale: float
    sync_period_seconds: float
    provisioning_delay_seconds: float
    metric: str  # "pods" (prometheus-adapter) or "external" (GMP)
    chart_values: dict[str, Any]
    model: str
    resolution: str
    steps: int
    slots_per_device: int
    max_queue: int
    cpu_limit: float | None
    server_args: tuple[str, ...]
    calibrate_seconds: float
    capacity_per_pod: float | None  # requests/s; measured when None
    callers: int
    deadline_seconds: float
    max_attempts: int  # the client's RetryPolicy.max_attempts (its default is 5)
    retry_budget: RetryBudget | None  # the client's RetryPolicy.budget; None: every overload retried
    rate_unit: str  # "pod_capacity" or "requests_per_second"
    profile: tuple[Segment, ...]
    kills: tuple[Kill, ...]
    slo_p99_seconds: float
    window_seconds: float
    settle_seconds: float  # after the profile: wait this long for scale-down to finish (real seconds)
    expect: dict[str, Any] = field(default_factory=dict)

    @property
    def duration(self) -> float:
        return sum(s.seconds for s in self.profile)

    @property
    def demand_window_seconds(self) -> float:
        """The pods' --demand-window-seconds: the server's default (10 s) compressed with the rest, never
        below a second, where a compressed scenario's few arrivals per window would make the signal
        mostly noise."""
        return max(DEMAND_WINDOW_SECONDS * self.time_scale, MIN_DEMAND_WINDOW_SECONDS)

    def segment(self, mark: str) -> Segment | None:
        return next((s for s in self.profile if s.mark == mark), None)


class LiveProfile:
    """The profile as it unfolds: segments end at their time, or at their event (``until_ready``,
    ``until_ready_at_most``)."""

    def __init__(self, segments: tuple[Segment, ...], ready: Callable[[], int]) -> None:
        self._segments = segments
        self._ready = ready
        self._index = 0
        self._start = 0.0
        self.marks: dict[str, float] = {}
        self.end: float | None = None
        self._enter(0.0)

    @property
    def peak(self) -> float:
        return max(max(s.rate, s.rate_to or 0.0) for s in self._segments) or 1.0

    def _enter(self, t: float) -> None:
        self._start = t
        if self._index < len(self._segments):
            mark = self._segments[self._index].mark
            if mark:
                self.marks[mark] = t
        elif self.end is None:
            self.end = t

    def _advance(self, t: float) -> None:
        while self._index < len(self._segments):
            segment = self._segments[self._index]
            elapsed = t - self._start
            if elapsed < segment.seconds:
                return
            waiting = segment.waits_for_an_event and segment.waiting(self._ready())
            if waiting and (segment.max_seconds is None or elapsed < segment.max_seconds):
                return
            end = t if segment.waits_for_an_event else self._start + segment.seconds
            self._index += 1
            self._enter(end)

    def rate(self, t: float) -> float:
        """Offered rate at ``t`` (seconds since the traffic started; call with a time that has come)."""
        self._advance(t)
        if self._index >= len(self._segments):
            return 0.0
        return self._segments[self._index].rate_at(t - self._start)

    def ended(self, t: float) -> bool:
        self._advance(t)
        return self._index >= len(self._segments)


def load(path: Path) -> Scenario:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ScenarioError(f"{path}: cannot read the scenario: {e}") from e
    return parse(data, str(path))


def parse(data: Any, where: str = "scenario") -> Scenario:
    root = _Fields(data, where)
    pod = _Fields(root.get("pod", {}), f"{where}: pod")
    traffic = _Fields(root.require("traffic"), f"{where}: traffic")
    profile = tuple(
        _segment(item, f"{where}: traffic.profile[{i}]") for i, item in enumerate(traffic.require("profile"))
    )
    if not profile:
        raise ScenarioError(f"{where}: traffic.profile must have at least one segment")
    kills = tuple(
        _kill(item, f"{where}: traffic.kills[{i}]") for i, item in enumerate(traffic.get("kills", []))
    )
    scenario = Scenario(
        name=str(root.get("name", "scenario")),
        time_scale=root.number("time_scale", 1.0, low=0.001, high=1.0),
        sync_period_seconds=root.number("sync_period_seconds", 15.0, low=0.1),
        provisioning_delay_seconds=root.number("provisioning_delay_seconds", 0.0, low=0.0),
        metric=root.choice("metric", "pods", ("pods", "external")),
        chart_values=root.mapping("chart_values"),
        model=str(pod.get("model", "tiny")),
        resolution=str(pod.get("resolution", "64x64")),
        steps=int(pod.number("steps", 4, low=1)),
        slots_per_device=int(pod.number("slots_per_device", 1, low=1)),
        max_queue=int(pod.number("max_queue", 8, low=1)),
        cpu_limit=pod.number("cpu_limit", None, low=0.01),
        server_args=tuple(str(a) for a in pod.get("extra_args", [])),
        calibrate_seconds=root.number("calibrate_seconds", 10.0, low=1.0),
        capacity_per_pod=root.number("capacity_per_pod", None, low=0.001),
        callers=int(traffic.number("callers", 4, low=1)),
        deadline_seconds=traffic.number("deadline_seconds", 60.0, low=0.1),
        max_attempts=int(traffic.number("max_attempts", 5, low=1)),
        retry_budget=_retry_budget(traffic, f"{where}: traffic.retry_budget"),
        rate_unit=traffic.choice("rate_unit", "pod_capacity", ("pod_capacity", "requests_per_second")),
        profile=profile,
        kills=kills,
        slo_p99_seconds=root.number("slo_p99_seconds", 5.0, low=0.001),
        window_seconds=root.number("window_seconds", 10.0, low=0.5),
        settle_seconds=root.number("settle_seconds", 0.0, low=0.0),
        expect=root.mapping("expect"),
    )
    for kill in kills:
        if kill.at >= scenario.duration:  # the shortest the profile can last
            raise ScenarioError(f"{where}: traffic.kills: at={kill.at} is after the profile ends")
    return scenario


def _retry_budget(traffic: _Fields, where: str) -> RetryBudget | None:
    """The client's default budget when absent; ``none`` (or null) for no budget; else its fields."""
    value = traffic.get("retry_budget", {})
    if value is None or value == "none":
        return None
    f = _Fields(value, where)
    default = RetryBudget()
    return RetryBudget(
        ratio=f.number("ratio", default.ratio, low=0.0, high=1.0),
        min_retrying=int(f.number("min_retrying", default.min_retrying, low=0)),
    )


def _segment(item: Any, where: str) -> Segment:
    f = _Fields(item, where)
    seconds = f.number("seconds", None, low=0.1)
    if seconds is None:
        raise ScenarioError(f"{where}.seconds is required")
    rate = f.number("rate", None, low=0.0)
    if rate is None:
        raise ScenarioError(f"{where}.rate is required")
    until_ready = f.number("until_ready", None, low=1)
    until_ready_at_most = f.number("until_ready_at_most", None, low=0)
    return Segment(
        seconds,
        rate,
        f.number("rate_to", None, low=0.0),
        f.get("mark"),
        None if until_ready is None else int(until_ready),
        None if until_ready_at_most is None else int(until_ready_at_most),
        f.number("max_seconds", None, low=seconds),
    )


def _kill(item: Any, where: str) -> Kill:
    f = _Fields(item, where)
    at = f.number("at", None, low=0.0)
    if at is None:
        raise ScenarioError(f"{where}.at is required")
    return Kill(at, f.choice("pod", "oldest_ready", ("oldest_ready", "newest_ready")))


class _Fields:
    def __init__(self, data: Any, where: str) -> None:
        if not isinstance(data, dict):
            raise ScenarioError(f"{where} must be a mapping")
        self._data = data
        self._where = where

    def get(self, key: str, default: Any = None) -> Any:
        return self._data.get(key, default)

    def require(self, key: str) -> Any:
        if key not in self._data:
            raise ScenarioError(f"{self._where}.{key} is required")
        return self._data[key]

    def number(
        self, key: str, default: float | None, low: float | None = None, high: float | None = None
    ) -> Any:
        value = self._data.get(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ScenarioError(f"{self._where}.{key} must be a number, got {value!r}")
        if (low is not None and value < low) or (high is not None and value > high):
            raise ScenarioError(f"{self._where}.{key} must be in [{low}, {high}], got {value}")
        return float(value)

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        value = self._data.get(key, default)
        if value not in choices:
            raise ScenarioError(f"{self._where}.{key} must be one of {', '.join(choices)}, got {value!r}")
        return str(value)

    def mapping(self, key: str) -> dict[str, Any]:
        value = self._data.get(key, {})
        if not isinstance(value, dict):
            raise ScenarioError(f"{self._where}.{key} must be a mapping")
        return value
