"""The HPA controller's decision after the metrics, ported from kubernetes/kubernetes
``pkg/controller/podautoscaler/horizontal.go``: min/max, the stabilization windows, the ``behavior``
policies with their periods and ``selectPolicy``, and the scale events those periods count.

``HorizontalController.reconcile`` is the part of ``reconcileAutoscaler`` after
``computeReplicasForMetrics``; the caller passes the metric's proposal (see replica_calculator.py).
Time comes from an injected clock (seconds), so the unit tests can place events in the past as the
upstream tests do with ``time.Now().Add(-...)``. Names follow the Go code so the two can be read side
by side.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

# --horizontal-pod-autoscaler-downscale-stabilization: the controller manager's default.
DEFAULT_DOWNSCALE_STABILIZATION_SECONDS = 300.0
# Without `behavior`, a scale-up may at most double (or reach 4) per sync (calculateScaleUpLimit).
SCALE_UP_LIMIT_FACTOR = 2.0
SCALE_UP_LIMIT_MINIMUM = 4.0

PODS_POLICY = "Pods"
PERCENT_POLICY = "Percent"
MAX_CHANGE = "Max"
MIN_CHANGE = "Min"
DISABLED = "Disabled"
_INT32_MAX = 2**31 - 1
_INT32_MIN = -(2**31)


@dataclass(frozen=True)
class ScalingPolicy:
    type: str  # "Pods" or "Percent"
    value: int
    period_seconds: int


@dataclass(frozen=True)
class ScalingRules:
    """``HPAScalingRules`` after API defaulting (see hpa_spec.py): only the window may stay None
    (scale-down: the controller's --horizontal-pod-autoscaler-downscale-stabilization applies)."""

    stabilization_window_seconds: int | None
    select_policy: str
    policies: tuple[ScalingPolicy, ...]
    tolerance: float | None = None


@dataclass(frozen=True)
class Behavior:
    scale_up: ScalingRules
    scale_down: ScalingRules


@dataclass
class TimestampedRecommendation:
    recommendation: int
    timestamp: float


@dataclass
class TimestampedScaleEvent:
    replica_change: int
    timestamp: float
    outdated: bool = False


@dataclass
class NormalizationArg:
    scale_up_behavior: ScalingRules
    scale_down_behavior: ScalingRules
    min_replicas: int
    max_replicas: int
    current_replicas: int
    desired_replicas: int


@dataclass
class Decision:
    """One sync's outcome, with upstream's condition reasons (for the report)."""

    desired_replicas: int
    rescale: bool
    able_to_scale_reason: str = ""
    scaling_limited_reason: str = ""


@dataclass
class HorizontalController:
    """The per-HPA state upstream keeps in maps keyed by the HPA: recommendations and scale events."""

    downscale_stabilisation_window: float = DEFAULT_DOWNSCALE_STABILIZATION_SECONDS
    clock: Callable[[], float] = time.monotonic
    recommendations: list[TimestampedRecommendation] = field(default_factory=list)
    scale_up_events: list[TimestampedScaleEvent] = field(default_factory=list)
    scale_down_events: list[TimestampedScaleEvent] = field(default_factory=list)

    def reconcile(
        self,
        current_replicas: int,
        metric_desired_replicas: int,
        min_replicas: int,
        max_replicas: int,
        behavior: Behavior | None,
    ) -> Decision:
        """``reconcileAutoscaler`` from the metrics' proposal on: returns what to set the Scale to."""
        if current_replicas == 0 and min_replicas != 0:
            return Decision(0, False, able_to_scale_reason="ScalingDisabled")
        if current_replicas > max_replicas:
            decision = Decision(max_replicas, True, scaling_limited_reason="TooManyReplicas")
        elif current_replicas < min_replicas:
            decision = Decision(min_replicas, True, scaling_limited_reason="TooFewReplicas")
        else:
            desired = max(0, metric_desired_replicas)
            if behavior is None:
                decision = self.normalize_desired_replicas(
                    current_replicas, desired, min_replicas, max_replicas
                )
            else:
                decision = self.normalize_desired_replicas_with_behaviors(
                    behavior, current_replicas, desired, min_replicas, max_replicas
                )
            decision.rescale = decision.desired_replicas != current_replicas
        if decision.rescale:
            self.store_scale_event(behavior, current_replicas, decision.desired_replicas)
        return decision

    # --- without `behavior` ---------------------------------------------------------------------------

    def stabilize_recommendation(self, prenormalized_desired_replicas: int) -> int:
        max_recommendation = prenormalized_desired_replicas
        found_old_sample, old_sample_index = False, 0
        cutoff = self.clock() - self.downscale_stabilisation_window
        for i, rec in enumerate(self.recommendations):
            if rec.timestamp < cutoff:
                found_old_sample, old_sample_index = True, i
            elif rec.recommendation > max_recommendation:
                max_recommendation = rec.recommendation
        entry = TimestampedRecommendation(prenormalized_desired_replicas, self.clock())
        if found_old_sample:
            self.recommendations[old_sample_index] = entry
        else:
            self.recommendations.append(entry)
        return max_recommendation

    def normalize_desired_replicas(
        self, current_replicas: int, prenormalized: int, min_replicas: int, max_replicas: int
    ) -> Decision:
        stabilized = self.stabilize_recommendation(prenormalized)
        able = "ScaleDownStabilized" if stabilized != prenormalized else "ReadyForNewScale"
        desired, limited, _ = convert_desired_replicas_with_rules(
            current_replicas, stabilized, min_replicas, max_replicas
        )
        return Decision(desired, False, able, limited)

    # --- with `behavior` ------------------------------------------------------------------------------

    def normalize_desired_replicas_with_behaviors(
        self,
        behavior: Behavior,
        current_replicas: int,
        prenormalized: int,
        min_replicas: int,
        max_replicas: int,
    ) -> Decision:
        scale_down = behavior.scale_down
        if scale_down.stabilization_window_seconds is None:  # maybeInitScaleDownStabilizationWindow
            scale_down = ScalingRules(
                int(self.downscale_stabilisation_window),
                scale_down.select_policy,
                scale_down.policies,
                scale_down.tolerance,
            )
        arg = NormalizationArg(
            behavior.scale_up, scale_down, min_replicas, max_replicas, current_replicas, prenormalized
        )
        stabilized, reason = self.stabilize_recommendation_with_behaviors(arg)
        arg.desired_replicas = stabilized
        able = reason if stabilized != prenormalized else "ReadyForNewScale"
        desired, limited = self.convert_desired_replicas_with_behavior_rate(arg)
        return Decision(desired, False, able, limited)

    def stabilize_recommendation_with_behaviors(self, args: NormalizationArg) -> tuple[int, str]:
        now = self.clock()
        found_old_sample, old_sample_index = False, 0
        up_recommendation = args.desired_replicas
        up_delay = args.scale_up_behavior.stabilization_window_seconds or 0
        up_cutoff = now - up_delay
        down_recommendation = args.desired_replicas
        down_delay = args.scale_down_behavior.stabilization_window_seconds or 0
        down_cutoff = now - down_delay
        for i, rec in enumerate(self.recommendations):
            if rec.timestamp > up_cutoff:
                up_recommendation = min(rec.recommendation, up_recommendation)
            if rec.timestamp > down_cutoff:
                down_recommendation = max(rec.recommendation, down_recommendation)
            if rec.timestamp < up_cutoff and rec.timestamp < down_cutoff:
                found_old_sample, old_sample_index = True, i
        recommendation = args.current_replicas
        recommendation = max(recommendation, up_recommendation)
        recommendation = min(recommendation, down_recommendation)
        entry = TimestampedRecommendation(args.desired_replicas, now)
        if found_old_sample:
            self.recommendations[old_sample_index] = entry
        else:
            self.recommendations.append(entry)
        reason = (
            "ScaleUpStabilized" if args.desired_replicas >= args.current_replicas else "ScaleDownStabilized"
        )
        return recommendation, reason

    def convert_desired_replicas_with_behavior_rate(self, args: NormalizationArg) -> tuple[int, str]:
        if args.desired_replicas > args.current_replicas:
            scale_up_limit = calculate_scale_up_limit_with_scaling_rules(
                args.current_replicas,
                self.scale_up_events,
                self.scale_down_events,
                args.scale_up_behavior,
                self.clock(),
            )
            scale_up_limit = max(scale_up_limit, args.current_replicas)
            maximum_allowed = args.max_replicas
            if maximum_allowed > scale_up_limit:
                maximum_allowed, reason = scale_up_limit, "ScaleUpLimit"
            else:
                reason = "TooManyReplicas"
            if args.desired_replicas > maximum_allowed:
                return maximum_allowed, reason
        elif args.desired_replicas < args.current_replicas:
            scale_down_limit = calculate_scale_down_limit_with_behaviors(
                args.current_replicas,
                self.scale_up_events,
                self.scale_down_events,
                args.scale_down_behavior,
                self.clock(),
            )
            scale_down_limit = min(scale_down_limit, args.current_replicas)
            minimum_allowed = args.min_replicas
            if minimum_allowed < scale_down_limit:
                minimum_allowed, reason = scale_down_limit, "ScaleDownLimit"
            else:
                reason = "TooFewReplicas"
            if args.desired_replicas < minimum_allowed:
                return minimum_allowed, reason
        return args.desired_replicas, "DesiredWithinRange"

    def store_scale_event(self, behavior: Behavior | None, prev_replicas: int, new_replicas: int) -> None:
        """``storeScaleEvent``: remembers a rescale for the policies' periods, reusing outdated slots."""
        if behavior is None:
            return
        if new_replicas > prev_replicas:
            events, rules, change = self.scale_up_events, behavior.scale_up, new_replicas - prev_replicas
        else:
            events, rules, change = self.scale_down_events, behavior.scale_down, prev_replicas - new_replicas
        mark_scale_events_outdated(events, get_longest_policy_period(rules), self.clock())
        old_index = None
        for i, event in enumerate(events):
            if event.outdated:
                old_index = i
        new_event = TimestampedScaleEvent(change, self.clock())
        if old_index is not None:
            events[old_index] = new_event
        else:
            events.append(new_event)


def convert_desired_replicas_with_rules(
    current_replicas: int, desired_replicas: int, hpa_min_replicas: int, hpa_max_replicas: int
) -> tuple[int, str, str]:
    """``convertDesiredReplicasWithRules`` (no `behavior`): min, max, and at most doubling per sync."""
    scale_up_limit = calculate_scale_up_limit(current_replicas)
    if hpa_max_replicas > scale_up_limit:
        maximum_allowed = scale_up_limit
        condition = "ScaleUpLimit"
        reason = "the desired replica count is increasing faster than the maximum scale rate"
    else:
        maximum_allowed = hpa_max_replicas
        condition = "TooManyReplicas"
        reason = "the desired replica count is more than the maximum replica count"
    if desired_replicas < hpa_min_replicas:
        return (
            hpa_min_replicas,
            "TooFewReplicas",
            "the desired replica count is less than the minimum replica count",
        )
    if desired_replicas > maximum_allowed:
        return maximum_allowed, condition, reason
    return desired_replicas, "DesiredWithinRange", "the desired count is within the acceptable range"


def calculate_scale_up_limit(current_replicas: int) -> int:
    return int(max(SCALE_UP_LIMIT_FACTOR * current_replicas, SCALE_UP_LIMIT_MINIMUM))


def get_replicas_change_per_period(
    period_seconds: int, scale_events: list[TimestampedScaleEvent], now: float
) -> int:
    cutoff = now - period_seconds
    return sum(event.replica_change for event in scale_events if event.timestamp > cutoff)


def mark_scale_events_outdated(
    scale_events: list[TimestampedScaleEvent], longest_policy_period: int, now: float
) -> None:
    cutoff = now - longest_policy_period
    for event in scale_events:
        if event.timestamp < cutoff:
            event.outdated = True


def get_longest_policy_period(rules: ScalingRules) -> int:
    return max((policy.period_seconds for policy in rules.policies), default=0)


def calculate_scale_up_limit_with_scaling_rules(
    current_replicas: int,
    scale_up_events: list[TimestampedScaleEvent],
    scale_down_events: list[TimestampedScaleEvent],
    rules: ScalingRules,
    now: float,
) -> int:
    """Most replicas the scale-up policies allow now (``selectPolicy`` Max: the largest proposal)."""
    if rules.select_policy == DISABLED:
        return current_replicas
    if rules.select_policy == MIN_CHANGE:
        result, select = _INT32_MAX, min
    else:
        result, select = _INT32_MIN, max
    for policy in rules.policies:
        added = get_replicas_change_per_period(policy.period_seconds, scale_up_events, now)
        deleted = get_replicas_change_per_period(policy.period_seconds, scale_down_events, now)
        period_start_replicas = current_replicas - added + deleted
        if policy.type == PODS_POLICY:
            proposed = period_start_replicas + policy.value
        else:  # Percent: rounded up, or a small fleet could never grow
            proposed = math.ceil(period_start_replicas * (1 + policy.value / 100))
        result = select(result, proposed)
    return result


def calculate_scale_down_limit_with_behaviors(
    current_replicas: int,
    scale_up_events: list[TimestampedScaleEvent],
    scale_down_events: list[TimestampedScaleEvent],
    rules: ScalingRules,
    now: float,
) -> int:
    """Fewest replicas the scale-down policies allow now (``selectPolicy`` Max: the largest change)."""
    if rules.select_policy == DISABLED:
        return current_replicas
    if rules.select_policy == MIN_CHANGE:
        result, select = _INT32_MIN, max
    else:
        result, select = _INT32_MAX, min
    for policy in rules.policies:
        added = get_replicas_change_per_period(policy.period_seconds, scale_up_events, now)
        deleted = get_replicas_change_per_period(policy.period_seconds, scale_down_events, now)
        period_start_replicas = current_replicas - added + deleted
        if policy.type == PODS_POLICY:
            proposed = period_start_replicas - policy.value
        else:  # Percent: Go's int32(float) conversion truncates toward zero
            proposed = int(period_start_replicas * (1 - policy.value / 100))
        result = select(result, proposed)
    return result
