"""What the fleet reads: the chart's rendered HPA (real `helm template`, typed by the `kubernetes` package)
and scenario files (every error names its field). Fast: no pods are started."""

from __future__ import annotations

import pytest
from sdxl_client import RetryBudget

from fleet import chart
from fleet.horizontal import PERCENT_POLICY, PODS_POLICY, ScalingPolicy
from fleet.scenario import LiveProfile, ScenarioError, parse


def test_the_default_hpa_is_gmp_external_average_value_with_the_values_behavior() -> None:
    rendered = chart.load({})
    hpa = rendered.hpa
    assert (hpa.metric_type, hpa.metric_name) == ("External", "prometheus.googleapis.com|sdxl_load|gauge")
    assert hpa.metric_selector["resource.labels.namespace"] == chart.NAMESPACE
    assert hpa.target_average_milli == 800
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


def test_prometheus_adapter_renders_a_pods_metric() -> None:
    hpa = chart.load({"metrics": {"backend": "prometheus-adapter"}, "autoscaling": {"targetLoad": 1.5}}).hpa
    assert (hpa.metric_type, hpa.metric_name, hpa.target_average_milli) == ("Pods", "sdxl_load", 1500)


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
