"""What the fleet reads: the chart's rendered HPA (real `helm template`, typed by the `kubernetes` package)
and scenario files (every error names its field). Fast: no pods are started."""

from __future__ import annotations

import asyncio

import pytest
from sdxl_client import RetryBudget

from fleet import chart
from fleet.horizontal import PERCENT_POLICY, PODS_POLICY, ScalingPolicy
from fleet.scenario import LiveProfile, ScenarioError, parse


def test_the_default_hpa_is_gmp_external_average_value_with_the_values_behavior() -> None:
    rendered = chart.load({})
    hpa = rendered.hpa
    assert (hpa.metric_type, hpa.metric_name) == (
        "External",
        "prometheus.googleapis.com|sdxl_demand_with_headroom|gauge",
    )
    assert chart.series_name(hpa.metric_name) == "sdxl_demand_with_headroom"
    assert hpa.metric_selector["resource.labels.namespace"] == chart.NAMESPACE
    assert hpa.target_average_milli == 700
    assert (hpa.min_replicas, hpa.max_replicas) == (1, 8)
    assert hpa.behavior is not None
    assert hpa.behavior.scale_down.stabilization_window_seconds == 600
    assert hpa.behavior.scale_down.policies == (ScalingPolicy(PODS_POLICY, 1, 300),)
    assert hpa.behavior.scale_up.policies == (
        ScalingPolicy(PERCENT_POLICY, 100, 180),
        ScalingPolicy(PODS_POLICY, 2, 180),
    )
    pods = rendered.pods
    assert (pods.readiness_period, pods.pre_stop_sleep, pods.scrape_interval) == (5.0, 5.0, 15.0)
    assert pods.termination_grace > pods.drain_seconds + pods.pre_stop_sleep
    assert pods.per_pod_compilation_cache  # the chart's default cache is an emptyDir
    # The headroom the fleet models: the recording rule its Prometheus evaluates, one spare node.
    records = {r.get("record") for g in rendered.rule_groups for r in g["rules"]}
    assert "sdxl_demand_with_headroom" in records
    assert rendered.spare_nodes == 1


def test_prometheus_adapter_renders_a_pods_metric_without_idle_slots() -> None:
    adapter = {"metrics": {"backend": "prometheus-adapter"}}
    hpa = chart.load({**adapter, "autoscaling": {"metric": "load", "targetLoad": 1.5}}).hpa
    assert (hpa.metric_type, hpa.metric_name, hpa.target_average_milli) == ("Pods", "sdxl_load", 1500)
    hpa = chart.load({**adapter, "autoscaling": {"headroom": {"idleSlots": 0}}}).hpa
    assert (hpa.metric_type, hpa.metric_name, hpa.target_average_milli) == ("Pods", "sdxl_demand", 700)
    rendered = chart.load({**adapter, "autoscaling": {"headroom": {"spareNodes": 0}}})
    assert (rendered.hpa.metric_type, rendered.hpa.metric_name) == ("External", "sdxl_demand_with_headroom")
    assert rendered.spare_nodes == 0


def test_a_partial_behavior_gets_the_api_servers_defaults() -> None:
    # scaleUp's policies and selectPolicy removed (null deletes a value in Helm), scaleDown's window too:
    # they default as GenerateHPAScaleUpRules / GenerateHPAScaleDownRules do.
    behavior = {
        "scaleUp": {"stabilizationWindowSeconds": 30, "policies": None, "selectPolicy": None},
        "scaleDown": {"stabilizationWindowSeconds": None, "policies": None},
    }
    hpa = chart.load({"autoscaling": {"behavior": behavior}}).hpa
    assert hpa.behavior is not None
    up, down = hpa.behavior.scale_up, hpa.behavior.scale_down
    assert (up.stabilization_window_seconds, up.select_policy) == (30, "Max")
    assert up.policies == (ScalingPolicy(PODS_POLICY, 4, 15), ScalingPolicy(PERCENT_POLICY, 100, 15))
    assert (down.stabilization_window_seconds, down.policies) == (
        None,
        (ScalingPolicy(PERCENT_POLICY, 100, 15),),
    )


def test_a_field_autoscaling_v2_does_not_define_is_refused() -> None:
    manifest = chart.render({})
    hpa = next(o for o in manifest if o["kind"] == "HorizontalPodAutoscaler")
    hpa["spec"]["behavior"]["scaleUp"]["stabilisationWindowSeconds"] = 5  # British spelling: not a field
    with pytest.raises(chart.ChartError, match="stabilisationWindowSeconds"):
        chart.parse_hpa(hpa)


def minimal(**changes: object) -> dict:
    scenario: dict = {"traffic": {"profile": [{"seconds": 10, "rate": 1}]}}
    scenario.update(changes)
    return scenario


def test_a_minimal_scenario_takes_the_defaults() -> None:
    s = parse(minimal())
    assert (s.time_scale, s.sync_period_seconds, s.metric, s.duration) == (1.0, 15.0, "pods", 10.0)
    profile = LiveProfile(s.profile, ready=lambda: 0)
    assert profile.rate(5) == 1.0 and profile.ended(10) and profile.end == 10
    assert s.retry_budget == RetryBudget()  # the client library's default


def test_the_retry_budget_can_be_set_or_turned_off() -> None:
    traffic = {"profile": [{"seconds": 10, "rate": 1}]}
    assert parse({"traffic": {**traffic, "retry_budget": "none"}}).retry_budget is None
    budget = parse({"traffic": {**traffic, "retry_budget": {"ratio": 0.5}}}).retry_budget
    assert budget == RetryBudget(ratio=0.5, min_retrying=RetryBudget().min_retrying)


@pytest.mark.parametrize(
    ("scenario", "field"),
    [
        (minimal(time_scale=2), "time_scale"),
        (minimal(metric="object"), "metric"),
        ({"traffic": {"profile": [{"rate": 1}]}}, "traffic.profile[0].seconds"),
        ({"traffic": {"profile": [{"seconds": 5, "rate": "lots"}]}}, "rate"),
        ({"traffic": {"profile": [{"seconds": 5, "rate": 1}], "kills": [{"at": 9}]}}, "traffic.kills"),
        ({}, "traffic"),
        (minimal(pod={"cpu_limit": 0}), "pod.cpu_limit"),
        (
            {"traffic": {"profile": [{"seconds": 5, "rate": 1}], "retry_budget": {"ratio": 2}}},
            "traffic.retry_budget.ratio",
        ),
    ],
)
def test_a_bad_scenario_names_the_field(scenario: dict, field: str) -> None:
    with pytest.raises(ScenarioError, match=field.replace("[", r"\[").replace("]", r"\]")):
        parse(scenario)


def test_a_ramp_interpolates() -> None:
    s = parse({"traffic": {"profile": [{"seconds": 10, "rate": 1, "rate_to": 3}]}})
    assert LiveProfile(s.profile, ready=lambda: 0).rate(5) == pytest.approx(2.0)


def test_a_segment_held_until_pods_are_ready_ends_at_that_event() -> None:
    s = parse({"traffic": {"profile": [
        {"seconds": 5, "rate": 1},
        {"seconds": 10, "rate": 4, "mark": "step", "until_ready": 3, "max_seconds": 100},
        {"seconds": 5, "rate": 1, "mark": "scale_down"},
    ]}})  # fmt: skip
    ready = [1]
    profile = LiveProfile(s.profile, ready=lambda: ready[0])
    assert profile.rate(4) == 1 and profile.rate(6) == 4 and profile.marks == {"step": 5.0}
    assert profile.rate(40) == 4  # past its 10 s, still waiting for 3 ready pods
    ready[0] = 3
    assert profile.rate(41) == 1 and profile.marks["scale_down"] == 41
    assert profile.ended(46)
    assert profile.end == 46


def test_a_segment_held_until_a_pod_leaves_ends_when_fewer_are_ready() -> None:
    s = parse({"traffic": {"profile": [
        {"seconds": 5, "rate": 2, "mark": "scale_down", "until_ready_at_most": 2, "max_seconds": 50},
        {"seconds": 5, "rate": 1},
    ]}})  # fmt: skip
    ready = [3]
    profile = LiveProfile(s.profile, ready=lambda: ready[0])
    assert profile.rate(30) == 2  # past its 5 s, 3 pods still ready
    ready[0] = 2
    assert profile.rate(31) == 1 and not profile.ended(35.5)
    assert profile.ended(36) and profile.end == 36
    ready[0] = 3
    capped = LiveProfile(s.profile, ready=lambda: ready[0])
    assert capped.rate(50) == 1  # no pod left within max_seconds: the segment ends anyway


def test_a_spare_node_is_taken_once_and_provisioned_again() -> None:
    from fleet.fleet import Fleet
    from fleet.pods import PodSettings

    settings = PodSettings((), None, 0.0, 1.0, 1.0, 3, 0.0, 1.0)

    async def scenario() -> list[bool | int]:
        fleet = Fleet(settings, None, None, lambda: 0.0, None, spare_nodes=1)  # type: ignore[arg-type]
        seen: list[bool | int] = [fleet._take_spare(), fleet._take_spare(), fleet.spares_ready]

        async def provisioned() -> None:  # the replacement's provisioning (0 s here) completes
            while fleet.spares_ready == 0:
                await asyncio.sleep(0)

        await asyncio.wait_for(provisioned(), 10)
        seen += [fleet.spares_ready, fleet._take_spare()]
        return seen

    assert asyncio.run(scenario()) == [True, False, 0, 1, True]


def test_warmup_phases_are_read_from_the_pods_log(tmp_path) -> None:
    import datetime
    import json

    from fleet.pods import warmup_phases

    def line(at: float, **fields: str) -> str:
        stamp = datetime.datetime.fromtimestamp(at, tz=datetime.UTC).isoformat(timespec="milliseconds")
        return json.dumps({"time": stamp, **fields})

    ready = (
        "engine ready: 4 slots on 1 devices in 12.3s (load 1.2s, memory_plan 0.4s, trace_and_compile 9.1s, "
        "schedules 0.0s, warm_up 1.0s); 9 programs (batch buckets 1/2/4 per device) built in 9.1s, 7 "
        "compilation cache hits"
    )
    start = 1_000_000.0
    log = tmp_path / "pod.log"
    log.write_text(
        "\n".join(
            [
                "not json: a library's own output",
                line(start + 3.0, event="listening", message="listening; warming up"),
                line(start + 15.0, message=ready),
                line(start + 15.5, event="ready", message="ready"),
            ]
        )
    )
    [phases] = warmup_phases(log, [start])
    assert phases == pytest.approx(
        {
            "to_listening": 3.0,
            "load": 1.2,
            "memory_plan": 0.4,
            "trace_and_compile": 9.1,
            "schedules": 0.0,
            "warm_up": 1.0,
            "compilation_cache_hits": 7.0,
            "engine_to_serving": 0.5,
        }
    )
