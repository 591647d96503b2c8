"""The HPA port (fleet/replica_calculator.py, horizontal.py) against cases ported from the upstream Go
tests in kubernetes/kubernetes pkg/controller/podautoscaler: each test or case is named after its Go
original (``TestReplicaCalcScaleUpCM`` -> ``test_replica_calc_scale_up_cm``), with the same inputs and
expected outputs. Values are milli-units, as upstream. A pod list of ``n`` pods is named
``test-pod-0..n-1`` and the metric levels belong to the first pods in order, as upstream's fixtures do.
"""

from __future__ import annotations

import pytest

from fleet.horizontal import (
    PERCENT_POLICY,
    PODS_POLICY,
    Behavior,
    HorizontalController,
    NormalizationArg,
    ScalingPolicy,
    ScalingRules,
    TimestampedRecommendation,
    TimestampedScaleEvent,
    convert_desired_replicas_with_rules,
)
from fleet.replica_calculator import (
    MetricsUnavailable,
    PodInfo,
    PodPhase,
    get_external_per_pod_metric_replicas,
    get_metric_replicas,
)

NOW = 10_000.0


def pods(count: int, ready: list[bool] | None = None, phases: list[PodPhase] | None = None,
         deleted: list[bool] | None = None) -> list[PodInfo]:  # fmt: skip
    return [
        PodInfo(
            f"test-pod-{i}",
            phases[i] if phases else PodPhase.RUNNING,
            ready=ready[i] if ready else True,
            being_deleted=deleted[i] if deleted else False,
        )
        for i in range(count)
    ]


def levels(*values: int) -> dict[str, int]:
    return {f"test-pod-{i}": v for i, v in enumerate(values)}


# --- replica_calculator_test.go ------------------------------------------------------------------------


def test_replica_calc_scale_up_cm() -> None:
    assert get_metric_replicas(3, 15000, levels(20000, 10000, 30000), pods(3)) == (4, 20000)


def test_replica_calc_scale_up_cm_unready_hot_cpu_no_less_scale() -> None:
    # A non-CPU metric: the unready pod's sample is used, not ignored (upstream expects 6, not 4).
    got = get_metric_replicas(3, 15000, levels(50000, 10000, 30000), pods(3, ready=[True, True, False]))
    assert got == (6, 30000)


def test_replica_calc_scale_up_cm_unready_hot_cpu_scale_would_scale_down() -> None:
    got = get_metric_replicas(3, 15000, levels(50000, 15000, 30000), pods(3, ready=[False, True, False]))
    assert got == (7, 31666)


def test_replica_calc_scale_up_cm_external() -> None:
    assert get_metric_replicas(1, 4400, levels(8600), pods(1)) == (2, 8600)


def test_replica_calc_scale_up_per_pod_cm_external() -> None:
    assert get_external_per_pod_metric_replicas(3, 2150, [8600]) == (4, 2867)


def test_replica_calc_scale_down_cm() -> None:
    got = get_metric_replicas(5, 20000, levels(12000, 12000, 12000, 12000, 12000), pods(5))
    assert got == (3, 12000)


def test_replica_calc_scale_down_per_pod_cm_external() -> None:
    assert get_external_per_pod_metric_replicas(5, 2867, [8600]) == (3, 1720)


def test_replica_calc_tolerance_cm() -> None:
    assert get_metric_replicas(3, 20000, levels(20000, 21000, 21000), pods(3)) == (3, 20666)


def test_replica_calc_tolerance_per_pod_cm_external() -> None:
    assert get_external_per_pod_metric_replicas(3, 2900, [8600]) == (3, 2867)


def test_per_pod_external_with_every_pod_deleting_sizes_from_the_usage_alone() -> None:
    # No pod counts in status.replicas while all are being deleted: Go's float division gives +Inf (a
    # ratio outside any tolerance: usage / target pods) or NaN for no usage (the count stays 0); the
    # port divided by zero and the sync loop died.
    assert get_external_per_pod_metric_replicas(0, 700, [1400, 700]) == (3, 2100)
    assert get_external_per_pod_metric_replicas(0, 700, [0, 0]) == (0, 0)


def test_plain_metric_replica_calc_missing_metrics_no_change_eq() -> None:
    assert get_metric_replicas(5, 20000, levels(20000, 19000, 21000), pods(5)) == (5, 20000)


# Cases of our own, on the paths the fleet exercises (upstream covers them only for CPU metrics).


def test_pending_pods_count_as_zero_on_a_scale_up() -> None:
    # 2 running pods at 2x the target, 2 pending (provisioning): sum 4 targets over 4 pods -> stay at 4.
    fleet = pods(4, phases=[PodPhase.RUNNING, PodPhase.RUNNING, PodPhase.PENDING, PodPhase.PENDING])
    assert get_metric_replicas(4, 1000, levels(2000, 2000), fleet) == (4, 2000)


def test_missing_metrics_count_as_the_target_on_a_scale_down() -> None:
    # One pod reports half the target, one reports nothing yet: the missing one holds the fleet at 2.
    assert get_metric_replicas(2, 1000, levels(500), pods(2)) == (2, 500)


def test_deleted_pods_are_ignored() -> None:
    fleet = pods(3, deleted=[False, False, True])
    assert get_metric_replicas(3, 1000, levels(1500, 1500, 0), fleet) == (3, 1500)


def test_no_metric_for_any_counted_pod_is_an_error() -> None:
    with pytest.raises(MetricsUnavailable):
        get_metric_replicas(1, 1000, {}, pods(1, phases=[PodPhase.PENDING]))


# --- horizontal_test.go: TestScalingWithRules (convertDesiredReplicasWithBehaviorRate) ------------------


def rules(pods_value: int = 0, pods_period: int = 0, percent: int = 0, percent_period: int = 0,
          window: int | None = None, select: str = "Max") -> ScalingRules:  # fmt: skip
    """``generateScalingRules`` (a zero leaves the policy out) after ``GenerateHPAScale*Rules``."""
    policies = []
    if pods_value:
        policies.append(ScalingPolicy(PODS_POLICY, pods_value, pods_period))
    if percent:
        policies.append(ScalingPolicy(PERCENT_POLICY, percent, percent_period))
    return ScalingRules(window, select, tuple(policies))


DEFAULT_UP = ScalingRules(
    0, "Max", (ScalingPolicy(PODS_POLICY, 4, 15), ScalingPolicy(PERCENT_POLICY, 100, 15))
)
DEFAULT_DOWN = ScalingRules(300, "Max", (ScalingPolicy(PERCENT_POLICY, 100, 15),))


def uniform_events(changes: list[int], period_seconds: int) -> list[TimestampedScaleEvent]:
    """``generateEventsUniformDistribution``: events at the middle of equal segments of the period."""
    segment = period_seconds / len(changes)
    return [
        TimestampedScaleEvent(change, NOW - (period_seconds - segment * (i + 1) + segment / 2))
        for i, change in enumerate(changes)
    ]


SCALING_WITH_RULES = [
    # name, up events, down events, min, max, up rules, down rules, current, prenormalized, expected, reason
    ("scaleUp with pod policy limitation", [], [], 1, 1000, rules(30, 60), None, 10, 50, 40, "ScaleUpLimit"),
    ("scaleUp with percent policy limitation", [], [], 1, 1000, rules(0, 0, 200, 60), None, 10, 50, 30,
     "ScaleUpLimit"),
    ("scaleDown with percent policy larger than pod policy", [], [], 1, 1000, None,
     rules(20, 60, 1, 60, 300), 100, 2, 80, "ScaleDownLimit"),
    ("scaleDown with pod policy larger than percent policy", [], [], 1, 1000, None,
     rules(2, 60, 1, 60, 300), 100, 2, 98, "ScaleDownLimit"),
    ("scaleDown with spec MinReplicas limitation with large percent policy", [], [], 5, 1000, None,
     rules(0, 0, 100, 60, 300), 10, 2, 5, "TooFewReplicas"),
    ("scaleDown with pod policy limitation", [], [], 1, 1000, None, rules(5, 60, 0, 0, 300), 10, 2, 5,
     "ScaleDownLimit"),
    ("scaleDown with percent policy limitation", [], [], 1, 1000, None, rules(0, 0, 50, 60, 300), 10, 5, 5,
     "DesiredWithinRange"),
    ("scaleUp with spec MaxReplicas limitation with large pod policy and events",
     uniform_events([1, 5, 9], 120), [], 1, 200, rules(300, 60), None, 100, 500, 200, "TooManyReplicas"),
    ("scaleUp with currentReplicas limitation with rate.PeriodSeconds with a lot of recent scale up events",
     uniform_events([1, 5, 9], 120), [], 1, 1000, rules(5, 120), None, 100, 500, 100, "ScaleUpLimit"),
    ("scaleUp with pod policy and previous scale up events", uniform_events([1, 5, 9], 120), [], 1, 1000,
     rules(150, 120), None, 100, 500, 235, "ScaleUpLimit"),
    ("scaleUp with percent policy and previous scale up events", uniform_events([1, 5, 9], 120), [], 1,
     1000, rules(0, 0, 200, 120), None, 100, 500, 255, "ScaleUpLimit"),
    ("scaleDown with default policy and previous events", [], uniform_events([1, 5, 9], 120), 1, 1000,
     None, None, 10, 5, 5, "DesiredWithinRange"),
    ("scaleDown with pod policy limitation and previous events", [], uniform_events([1, 5, 9], 120), 1,
     1000, None, rules(5, 120, 0, 0, 300), 100, 2, 100, "ScaleDownLimit"),
    ("scaleDown with percent policy limitation and previous events", [], uniform_events([2, 4, 6], 120), 1,
     1000, None, rules(0, 0, 50, 120, 300), 100, 0, 56, "ScaleDownLimit"),
    ("scaleDown with previous events preventing further scale down", [], uniform_events([10, 10, 10], 120),
     1, 1000, None, rules(0, 0, 10, 120, 300), 100, 0, 100, "ScaleDownLimit"),
    ("scaleDown with with previous events still allowing more scale down", [],
     uniform_events([10, 10, 10], 120), 1, 1000, None, rules(0, 0, 1000, 120, 300), 10, 5, 5,
     "DesiredWithinRange"),
    ("check that events were marked 'outdated' for two different policies in the behavior for up",
     uniform_events([8, 12, 9, 11], 120), [], 1, 1000, rules(1000, 30, 100, 60), None, 100, 200, 200,
     "DesiredWithinRange"),
]  # fmt: skip


@pytest.mark.parametrize("case", SCALING_WITH_RULES, ids=[c[0] for c in SCALING_WITH_RULES])
def test_scaling_with_rules(case: tuple) -> None:
    _, up_events, down_events, low, high, up, down, current, prenormalized, expected, condition = case
    controller = HorizontalController(clock=lambda: NOW)
    controller.scale_up_events = list(up_events)
    controller.scale_down_events = list(down_events)
    arg = NormalizationArg(up or DEFAULT_UP, down or DEFAULT_DOWN, low, high, current, prenormalized)
    assert controller.convert_desired_replicas_with_behavior_rate(arg) == (expected, condition)


# --- horizontal_test.go: TestNormalizeDesiredReplicasWithBehavior (stabilization windows) ----------------

NORMALIZE_WITH_BEHAVIOR = [
    # name, recommendations (replicas, seconds ago), current, prenormalized, expected, log length, up window
    ("empty log", [], 100, 5, 5, 1, 0),
    ("stabilize", [(10, 60), (9, 120)], 100, 5, 10, 3, 0),
    ("no stabilization", [(10, 60), (9, 120)], 100, 12, 12, 3, 0),
    ("stabilize down to the highest recent recommendation", [(4, 60), (5, 120)], 100, 3, 5, 3, 0),
    ("scale up stabilized with recent recommendations", [(10, 60), (12, 120), (11, 180)], 1, 20, 10, 4, 300),
    ("no stabilization - old recommendations", [(10, 600), (9, 540)], 100, 3, 3, 2, 0),
    ("stabilize down - old recommendations", [(10, 600), (4, 60), (5, 120), (9, 540)], 100, 3, 5, 4, 0),
    ("stabilize up - old recommendations", [(10, 600), (4, 60), (5, 120), (9, 540)], 1, 7, 4, 4, 300),
]  # fmt: skip


@pytest.mark.parametrize("case", NORMALIZE_WITH_BEHAVIOR, ids=[c[0] for c in NORMALIZE_WITH_BEHAVIOR])
def test_normalize_desired_replicas_with_behavior(case: tuple) -> None:
    _, history, current, prenormalized, expected, log_length, up_window = case
    controller = HorizontalController(clock=lambda: NOW)
    controller.recommendations = [TimestampedRecommendation(r, NOW - ago) for r, ago in history]
    behavior = Behavior(
        scale_up=ScalingRules(up_window, "Max", (ScalingPolicy(PERCENT_POLICY, 1000, 15),)),
        scale_down=ScalingRules(300, "Max", (ScalingPolicy(PERCENT_POLICY, 100, 15),)),
    )
    decision = controller.normalize_desired_replicas_with_behaviors(behavior, current, prenormalized, 1, 1000)
    assert decision.desired_replicas == expected
    assert len(controller.recommendations) == log_length


def test_convert_desired_replicas_with_rules() -> None:
    # TestConvertDesiredReplicasWithRules: min, max and (without behavior) at most doubling.
    assert convert_desired_replicas_with_rules(5, 7, 3, 10)[:2] == (7, "DesiredWithinRange")
    assert convert_desired_replicas_with_rules(5, 2, 3, 10)[:2] == (3, "TooFewReplicas")
    assert convert_desired_replicas_with_rules(5, 15, 3, 10)[:2] == (10, "TooManyReplicas")
    assert convert_desired_replicas_with_rules(1, 15, 1, 100)[:2] == (4, "ScaleUpLimit")


def test_reconcile_records_scale_events_that_limit_the_next_period() -> None:
    # The chart's scale-down (1 pod per 300 s): a second removal inside the period is held back.
    clock = [NOW]
    controller = HorizontalController(clock=lambda: clock[0])
    behavior = Behavior(
        scale_up=DEFAULT_UP, scale_down=ScalingRules(0, "Max", (ScalingPolicy(PODS_POLICY, 1, 300),))
    )
    assert controller.reconcile(4, 1, 1, 8, behavior).desired_replicas == 3
    clock[0] += 15
    assert controller.reconcile(3, 1, 1, 8, behavior).desired_replicas == 3
    clock[0] += 300
    assert controller.reconcile(3, 1, 1, 8, behavior).desired_replicas == 2
