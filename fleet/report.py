"""The fleet report: figures (JSON) and a plot over time (PNG). Definitions, also in docs/AUTOSCALING.md:

- ``lost``: requests that got no answer at all by the end, plus those whose final status says accepted
  work was dropped (CANCELLED, INTERNAL, UNKNOWN, ABORTED, DATA_LOSS). A clean, final rejection the
  caller was told about (RESOURCE_EXHAUSTED after its retries, UNAVAILABLE, DEADLINE_EXCEEDED) is
  ``failed``, not lost; so is CANCELLED_AT_DEADLINE, a call that ended CANCELLED within 1 s of its
  deadline (the server's copy of the deadline fired first).
- ``failed``: final non-OK statuses, by name (after the client's retries); ``lost_messages`` and
  ``failed_messages``: the commonest "STATUS: grpc details" texts among them, which say who ended a call.
- ``retries_refused_by_budget``: overload answers the clients' retry budget did not retry.
- ``needed_replicas``: pods needed to carry the step's rate at all: ceil(rate / one pod's capacity).
- ``scale_up_seconds``: the traffic step to the first moment ``needed_replicas`` pods are ready.
- ``metric_moved_seconds``: the step to the first scrape where the average ``sdxl_load`` Prometheus holds
  exceeds the target by more than the tolerance; ``desired_reached_seconds``: the step to the first HPA
  sync whose desired replicas reach ``needed_replicas``.
- ``p99_within_slo_from_seconds``: from the step, the start of the first window after which every
  window's p99 (by arrival) stays within the SLO until the step ends.
- ``scale_down.failed``: final non-OK statuses of the requests in flight at any moment between the first
  pod deletion after the scale-down mark and the last such pod's exit ("while pods leave").
- ``recovery_deadline_seconds``: provisioning delay + mean warm-up + two sync periods, after the step.
  ``p99_after_recovery_seconds``: p99 latency of the requests that arrived after that deadline and before
  the step ended.
- ``max_replicas_during_step``: the most replicas the HPA asked for (and the most ready) from the step to
  the scale-down mark; ``step_decisions``: each HPA sync in that time that changed the desired replicas
  (seconds after the step, replicas); ``first_decision_replicas``: what the first of them asked for.
- ``step_failed_ratio``: final failures among the requests that arrived during the step.
- ``signals``: the per-pod ``sdxl_demand`` and ``sdxl_load`` summed over the pods Prometheus scraped,
  against the pods' worth offered (rate / one pod's capacity), averaged before the step and during the step
  until the needed pods were ready: what each signal shows of a step.
- ``warmup_phases``: mean and max seconds of each phase of a pod's start, from the pods' logs
  (pods/warmup_phases); ``spare_nodes``: nodes the chart's headroom keeps, ``pods_on_spare_nodes``: new
  pods that took one and skipped the provisioning delay.
- ``checks``: each goal (docs/AUTOSCALING.md) with the figure it is judged on and whether it holds.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from fleet.chart import RenderedChart
from fleet.fleet import Autoscaler, Fleet
from fleet.scenario import LiveProfile, Scenario
from fleet.traffic import LOSS_CODES, RequestRecord, TrafficLog


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def _failures(requests: list[RequestRecord]) -> dict[str, int]:
    return dict(Counter(r.code or "NO_ANSWER" for r in requests if r.code != "OK"))


def _messages(requests: list[RequestRecord], most: int = 10) -> dict[str, int]:
    """The commonest error texts among ``requests`` (status and grpc's details), to say why calls ended."""
    texts = Counter(f"{r.code or 'NO_ANSWER'}: {r.message or ''}" for r in requests)
    return dict(texts.most_common(most))


def build(
    scenario: Scenario,
    profile: LiveProfile,
    rendered: RenderedChart,
    fleet: Fleet,
    autoscaler: Autoscaler,
    log: TrafficLog,
    capacity: float,
    end: float,
) -> dict[str, Any]:
    hpa = rendered.hpa
    requests = log.requests
    lost = [r for r in requests if r.code is None or r.code in LOSS_CODES]
    per_unit = capacity if scenario.rate_unit == "pod_capacity" else 1.0
    step = profile.marks.get("step")
    scale_down = profile.marks.get("scale_down")
    traffic_end = profile.end if profile.end is not None else end
    target = hpa.target_average_milli / 1000.0
    pods = fleet.gone + fleet.pods
    warmups = [s - st for p in pods for st, s in zip(p.record.started, p.record.serving, strict=False)]
    for p in pods:
        p.record.read_warmups(fleet.settings.log_dir)
    warmup = sum(warmups) / len(warmups) if warmups else 0.0
    sync_period = scenario.sync_period_seconds * scenario.time_scale
    result: dict[str, Any] = {
        "scenario": scenario.name,
        "time_scale": scenario.time_scale,
        "metric": scenario.metric,
        "hpa": {
            "metric_type": hpa.metric_type,
            "metric_name": hpa.metric_name,
            "target_average_value": target,
            "min_replicas": hpa.min_replicas,
            "max_replicas": hpa.max_replicas,
            "behavior": _behavior(rendered),
        },
        "chart_values": scenario.chart_values,
        "pod_timings_after_time_scale": {
            k: v * scenario.time_scale if isinstance(v, float) else v for k, v in vars(rendered.pods).items()
        },
        "sync_period_seconds": sync_period,
        "provisioning_delay_seconds": scenario.provisioning_delay_seconds,
        "cpu_limit_per_pod": scenario.cpu_limit,
        "cpu_limit_applied": fleet.cpu_limit_applied,
        "capacity_per_pod_rps": capacity,
        "slo_p99_seconds": scenario.slo_p99_seconds,
        "window_seconds": scenario.window_seconds,
        "warmup_seconds": {"mean": warmup, "max": max(warmups, default=0.0), "count": len(warmups)},
        "warmup_phases": _warmup_phases([w for p in pods for w in p.record.warmups]),
        "spare_nodes": fleet.spare_nodes,
        "pods_on_spare_nodes": sum(1 for p in pods if p.record.on_spare_node),
        "requests": len(requests),
        "ok": sum(1 for r in requests if r.code == "OK"),
        "lost": len(lost),
        "lost_messages": _messages(lost),
        "failed": _failures(requests),
        "failed_messages": _messages([r for r in requests if r.code not in (None, "OK")]),
        "retries_by_code": dict(log.retries_by_code),
        "retry_budget": None if scenario.retry_budget is None else vars(scenario.retry_budget),
        "retries_refused_by_budget": log.retries_refused_by_budget,
        "max_ready_replicas": max((s.ready for s in autoscaler.samples), default=0),
        "max_desired_replicas": max((s.desired_replicas for s in autoscaler.syncs), default=0),
    }
    if step is not None:
        result.update(
            _step_figures(
                scenario,
                traffic_end,
                autoscaler,
                requests,
                step,
                scale_down,
                per_unit,
                capacity,
                target,
                hpa.tolerances.scale_up,
                warmup,
                sync_period,
            )
        )
    if scale_down is not None:
        removed = [p.record for p in pods if p.record.deleted is not None and p.record.deleted >= scale_down]
        leaving = _leaving_interval(removed, end)
        overlapping = (
            []
            if leaving is None
            else [r for r in requests if r.arrived < leaving[1] and (r.ended is None or r.ended > leaving[0])]
        )
        result["scale_down"] = {
            "pods_removed": len(removed),
            "removed_at_seconds": sorted(round(r.deleted - scale_down, 1) for r in removed if r.deleted),
            "leaving_interval": leaving,
            "requests_while_pods_leave": len(overlapping),
            "failed": _failures(overlapping),
            "replicas_at_end": fleet.replicas,
        }
    if scenario.kills:
        result["kills"] = [_kill_figures(k.at, requests, autoscaler, scenario) for k in scenario.kills]
    result["windows"] = _windows(scenario, requests, log, end)
    result["timeline"] = {
        "syncs": [vars(s) for s in autoscaler.syncs],
        "samples": [
            {
                "t": s.t,
                "replicas": s.replicas,
                "running": s.running,
                "ready": s.ready,
                "endpoints": s.endpoints,
                "load_by_pod": s.load_by_pod,
                "load_average": sum(s.load_by_pod.values()) / len(s.load_by_pod) if s.load_by_pod else None,
                "demand_by_pod": s.demand_by_pod,
                "demand_sum": sum(s.demand_by_pod.values()) if s.demand_by_pod else None,
                "spares_ready": s.spares_ready,
            }
            for s in autoscaler.samples
        ],
        "pods": [vars(p.record) for p in pods],
        "requests": [
            [round(r.arrived, 3), None if r.latency is None else round(r.latency, 4), r.code]
            for r in requests
        ],
    }
    result["checks"] = _checks(scenario, result)
    return result


def _leaving_interval(removed: list[Any], end: float) -> list[float] | None:
    """From the first deletion to the last exit: while some pod leaves the endpoints, sleeps, drains."""
    if not removed:
        return None
    exits = [r.exited[-1][0] for r in removed if r.exited]
    return [round(min(r.deleted for r in removed), 3), round(max(exits, default=end), 3)]


def _behavior(rendered: RenderedChart) -> dict[str, Any] | None:
    b = rendered.hpa.behavior
    if b is None:
        return None
    return {
        direction: {
            "stabilizationWindowSeconds": rules.stabilization_window_seconds,
            "selectPolicy": rules.select_policy,
            "policies": [vars(p) for p in rules.policies],
        }
        for direction, rules in (("scaleUp", b.scale_up), ("scaleDown", b.scale_down))
    }


def _step_figures(
    scenario: Scenario,
    traffic_end: float,
    autoscaler: Autoscaler,
    requests: list[RequestRecord],
    step: float,
    scale_down: float | None,
    per_unit: float,
    capacity: float,
    target: float,
    tolerance: float,
    warmup: float,
    sync_period: float,
) -> dict[str, Any]:
    segment = scenario.segment("step")
    high_rate = (segment.rate if segment else 0.0) * per_unit
    needed = min(autoscaler.hpa.max_replicas, math.ceil(high_rate / capacity))
    step_end = scale_down if scale_down is not None else traffic_end

    def first(times: list[float]) -> float | None:
        return round(min(times) - step, 2) if times else None

    def signal(sample: Any) -> dict[str, float]:  # the per-pod series the HPA's metric is made of
        demand = "sdxl_demand" in autoscaler.hpa.metric_name
        return sample.demand_by_pod if demand else sample.load_by_pod

    moved = first(
        [
            s.t
            for s in autoscaler.samples
            if s.t >= step
            and signal(s)
            and sum(signal(s).values()) / len(signal(s)) > target * (1 + tolerance)
        ]
    )
    desired = first([s.t for s in autoscaler.syncs if s.t >= step and s.desired_replicas >= needed])
    ready = first([s.t for s in autoscaler.samples if s.t >= step and s.ready >= needed])
    deadline = scenario.provisioning_delay_seconds + warmup + 2 * sync_period
    after = [
        r.latency
        for r in requests
        if step + deadline <= r.arrived < step_end and r.code == "OK" and r.latency is not None
    ]
    during = [r for r in requests if step <= r.arrived < step_end]
    width = scenario.window_seconds
    p99_by_window = []
    t = step
    while t < step_end:
        ok = [r.latency for r in requests if t <= r.arrived < t + width and r.code == "OK" and r.latency]
        p99_by_window.append((t, percentile(ok, 0.99)))
        t += width
    late = [t for t, p in p99_by_window if p is not None and p > scenario.slo_p99_seconds]
    recovered = None if not p99_by_window else (step if not late else late[-1] + width)
    recovered = None if recovered is None or recovered >= step_end else round(recovered - step, 1)
    in_step = [s for s in autoscaler.samples if step <= s.t < step_end]
    changes = []
    previous = next((y.desired_replicas for y in reversed(autoscaler.syncs) if y.t < step), None)
    for y in autoscaler.syncs:
        if step <= y.t < step_end and y.desired_replicas != previous:
            changes.append([round(y.t - step, 1), y.desired_replicas])
            previous = y.desired_replicas
    before_rate = _rate_before(scenario, step) * per_unit
    ready_at = step + ready if ready is not None else step_end
    filled = step + scenario.demand_window_seconds
    return {
        "step_rate_rps": high_rate,
        "needed_replicas": needed,
        "max_replicas_during_step": max((s.replicas for s in in_step), default=0),
        "max_ready_during_step": max((s.ready for s in in_step), default=0),
        "step_decisions": changes,
        "first_decision_replicas": changes[0][1] if changes else None,
        "step_failed_ratio": (sum(_failures(during).values()) / len(during)) if during else 0.0,
        "signals": {
            "before_step": _signal_means(
                [s for s in autoscaler.samples if step - 60.0 <= s.t < step], before_rate / capacity
            ),
            # From when the pods' demand window has filled with the step's arrivals until the need is
            # ready, and at least two syncs long: a fast start can ready the need before the window fills.
            "step_until_ready": _signal_means(
                [s for s in autoscaler.samples if filled <= s.t < max(ready_at, filled + 2 * sync_period)],
                high_rate / capacity,
            ),
        },
        "metric_moved_seconds": moved,
        "desired_reached_seconds": desired,
        "desired_after_metric_moved_seconds": None
        if moved is None or desired is None
        else round(desired - moved, 2),
        "scale_up_seconds": ready,
        "recovery_deadline_seconds": round(deadline, 2),
        "p99_after_recovery_seconds": percentile(after, 0.99),
        "p99_within_slo_from_seconds": recovered,
        "p50_after_recovery_seconds": percentile(after, 0.50),
        "requests_after_recovery": len(after),
        "step_failed": _failures(during),
    }


def _rate_before(scenario: Scenario, step: float) -> float:
    """The profile's rate just before the step (the segment that ends where the step starts)."""
    t = 0.0
    for segment in scenario.profile:
        if segment.mark == "step":
            break
        rate, t = segment.rate_at(segment.seconds), t + segment.seconds
    else:
        return 0.0
    return rate if t > 0 else 0.0


def _signal_means(samples: list[Any], offered_pods: float) -> dict[str, float | None]:
    def mean(values: list[float]) -> float | None:
        return round(sum(values) / len(values), 3) if values else None

    return {
        "offered_pods": round(offered_pods, 3),
        "sdxl_demand_sum": mean([sum(s.demand_by_pod.values()) for s in samples if s.demand_by_pod]),
        "sdxl_load_sum": mean([sum(s.load_by_pod.values()) for s in samples if s.load_by_pod]),
        "samples": len(samples),
    }


def _warmup_phases(warmups: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    names = list(dict.fromkeys(name for w in warmups for name in w))
    return {
        name: {
            "mean": round(sum(values) / len(values), 3),
            "max": round(max(values), 3),
            "count": len(values),
        }
        for name in names
        for values in [[w[name] for w in warmups if name in w]]
    }


def _kill_figures(
    at: float, requests: list[RequestRecord], autoscaler: Autoscaler, scenario: Scenario
) -> dict[str, Any]:
    window = [r for r in requests if at - scenario.deadline_seconds <= r.arrived < at + 60.0]
    before = [s.ready for s in autoscaler.samples if s.t < at][-1:] or [0]
    back = [s.t for s in autoscaler.samples if s.t > at and s.ready >= before[0]]
    dip = [s.t for s in autoscaler.samples if s.t > at and s.ready < before[0]]
    return {
        "at": at,
        "ready_before": before[0],
        "ready_back_after_seconds": round(min(t for t in back if not dip or t > min(dip)) - at, 2)
        if back and dip and any(t > min(dip) for t in back)
        else None,
        "requests_around": len(window),
        "failed": _failures(window),
    }


def _windows(
    scenario: Scenario, requests: list[RequestRecord], log: TrafficLog, end: float
) -> list[dict[str, Any]]:
    width = scenario.window_seconds
    count = max(1, math.ceil(end / width))
    windows = []
    for i in range(count):
        lo, hi = i * width, (i + 1) * width
        arrived = [r for r in requests if lo <= r.arrived < hi]
        ok = [r.latency for r in arrived if r.code == "OK" and r.latency is not None]
        served = sum(1 for r in requests if r.code == "OK" and r.ended is not None and lo <= r.ended < hi)
        windows.append(
            {
                "t": lo,
                "offered_rps": len(arrived) / width,
                "served_rps": served / width,
                "p50_seconds": percentile(ok, 0.5),
                "p99_seconds": percentile(ok, 0.99),
                "rejections": sum(
                    1 for t, code in log.retries if lo <= t < hi and code == "RESOURCE_EXHAUSTED"
                ),
                "retries": sum(1 for t, _ in log.retries if lo <= t < hi),
                "failed": _failures([r for r in arrived]),
            }
        )
    return windows


def _check(goal: str, figure: Any, ok: bool) -> dict[str, Any]:
    return {"goal": goal, "figure": figure, "ok": bool(ok)}


def _checks(scenario: Scenario, result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The issue's goals, each with the figure it is judged on (``expect`` in the scenario adds
    thresholds: ``step_failed_ratio``, the most failed requests during the step)."""
    checks = {"no_request_lost": _check("0 requests lost", result["lost"], result["lost"] == 0)}
    if "needed_replicas" in result:
        need = result["needed_replicas"]
        checks["scaled_up_to_needed"] = _check(
            f"{need} pods ready during the step (seconds after it)",
            result["scale_up_seconds"],
            result["scale_up_seconds"] is not None,
        )
        most = max(result["max_replicas_during_step"], result["max_ready_during_step"])
        checks["replicas_within_need_plus_one"] = _check(
            f"replicas at most the need plus one ({need + 1}) at every point of the step",
            most,
            most <= need + 1,
        )
        first = result["first_decision_replicas"]
        checks["sized_in_one_decision"] = _check(
            f"the first scale-up decision of the step asks for {need} to {need + 1} replicas",
            first,
            first is not None and need <= first <= need + 1,
        )
        d = result["desired_after_metric_moved_seconds"]
        checks["desired_within_two_syncs_of_metric"] = _check(
            f"desired replicas reach the need within 2 syncs ({2 * result['sync_period_seconds']:g} s) "
            "of the metric moving",
            d,
            d is not None and d <= 2 * result["sync_period_seconds"] + 1e-6,
        )
        p99 = result["p99_after_recovery_seconds"]
        checks["p99_within_slo_after_recovery"] = _check(
            f"p99 within the SLO ({scenario.slo_p99_seconds:g} s) from the recovery deadline "
            f"({result['recovery_deadline_seconds']:g} s after the step)",
            p99,
            p99 is not None and p99 <= scenario.slo_p99_seconds,
        )
        limit = float(scenario.expect.get("step_failed_ratio", 0.0))
        ratio = result["step_failed_ratio"]
        checks["step_failures_within_limit"] = _check(
            f"at most {limit:.1%} of the step's requests failed", round(ratio, 4), ratio <= limit
        )
    if "scale_down" in result:
        sd = result["scale_down"]
        checks["scaled_down"] = _check("scale-down removes pods", sd["pods_removed"], sd["pods_removed"] > 0)
        checks["no_failures_during_scale_down"] = _check(
            "0 failed while pods leave", sum(sd["failed"].values()), not sd["failed"]
        )
    if "kills" in result:
        failed = sum(sum(k["failed"].values()) for k in result["kills"])
        checks["no_failures_around_kills"] = _check("0 failed around a pod's SIGKILL", failed, failed == 0)
    return checks


def format_summary(result: dict[str, Any]) -> str:
    r = result
    lines = [
        f"scenario {r['scenario']} (time_scale {r['time_scale']}, metric {r['metric']}, capacity "
        f"{r['capacity_per_pod_rps']:.2f} req/s per pod, cpu limit applied: {r['cpu_limit_applied']})",
        f"requests {r['requests']}  ok {r['ok']}  lost {r['lost']}  failed {r['failed']}  "
        f"retries {r['retries_by_code']} (refused by the retry budget: {r['retries_refused_by_budget']})",
        f"max ready replicas {result['max_ready_replicas']}  max desired {result['max_desired_replicas']}  "
        f"warm-up {result['warmup_seconds']['mean']:.1f} s",
    ]
    if r["lost_messages"]:
        lines.append(f"lost, by message: {r['lost_messages']}")
    if "needed_replicas" in result:
        lines.append(
            f"step: needed {result['needed_replicas']}  metric moved +{result['metric_moved_seconds']} s  "
            f"desired reached +{result['desired_reached_seconds']} s  ready +{result['scale_up_seconds']} s  "
            f"p99 after recovery {_fmt(r['p99_after_recovery_seconds'])} s (SLO {r['slo_p99_seconds']} s)"
        )
    if "scale_down" in result:
        sd = result["scale_down"]
        lines.append(
            f"scale-down: {sd['pods_removed']} pods removed at +{sd['removed_at_seconds']} s, "
            f"failed {sd['failed']}"
        )
    for k in result.get("kills", []):
        lines.append(
            f"kill at {k['at']} s: ready back after {k['ready_back_after_seconds']} s, failed {k['failed']}"
        )
    for name, check in result["checks"].items():
        lines.append(f"{'ok    ' if check['ok'] else 'FAILED'} {check['goal']}: {check['figure']}  ({name})")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def plot(result: dict[str, Any], path: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timeline, windows = result["timeline"], result["windows"]
    fig, axes = plt.subplots(5, 1, figsize=(11, 13), sharex=True)
    syncs, samples = timeline["syncs"], timeline["samples"]
    ax = axes[0]
    ax.step(
        [s["t"] for s in syncs], [s["desired_replicas"] for s in syncs], where="post", label="desired (HPA)"
    )
    ax.step([s["t"] for s in samples], [s["ready"] for s in samples], where="post", label="ready")
    ax.step(
        [s["t"] for s in samples], [s["running"] for s in samples], where="post", label="running", alpha=0.5
    )
    ax.set_ylabel("replicas")
    ax.legend(loc="upper right")
    ax = axes[1]
    ax.plot(
        [s["t"] for s in samples], [s["load_average"] for s in samples], label="avg sdxl_load (Prometheus)"
    )
    ax.plot(
        [s["t"] for s in samples],
        [s.get("demand_sum") for s in samples],
        label="sum of sdxl_demand (pods' worth arriving)",
    )
    ax.axhline(result["hpa"]["target_average_value"], color="grey", linestyle="--", label="target")
    ax.set_ylabel("signal")
    ax.legend(loc="upper right")
    ax = axes[2]
    t = [w["t"] for w in windows]
    ax.plot(t, [w["offered_rps"] for w in windows], label="offered")
    ax.plot(t, [w["served_rps"] for w in windows], label="served")
    ax.set_ylabel("requests/s")
    ax.legend(loc="upper right")
    ax = axes[3]
    done = [r for r in timeline["requests"] if r[2] == "OK"]
    bad = [r for r in timeline["requests"] if r[2] != "OK"]
    ax.scatter([r[0] for r in done], [r[1] for r in done], s=2, color="lightgrey", label="each request (OK)")
    if bad:
        ax.scatter(
            [r[0] for r in bad], [r[1] or 0.0 for r in bad], s=12, color="red", marker="x", label="not OK"
        )
    ax.plot(t, [w["p50_seconds"] for w in windows], label="p50")
    ax.plot(t, [w["p99_seconds"] for w in windows], label="p99")
    ax.axhline(result["slo_p99_seconds"], color="grey", linestyle="--", label="SLO (p99)")
    ax.set_yscale("log")
    ax.set_ylabel("latency (s)")
    ax.legend(loc="upper right")
    ax = axes[4]
    ax.bar(
        t,
        [w["rejections"] for w in windows],
        width=result["window_seconds"],
        align="edge",
        alpha=0.6,
        label="RESOURCE_EXHAUSTED (retried)",
    )
    ax.plot(t, [sum(w["failed"].values()) for w in windows], color="red", label="failed (final)")
    ax.set_ylabel("per window")
    ax.set_xlabel("seconds since the traffic started")
    ax.legend(loc="upper right")
    for ax in axes:
        for k in result.get("kills", []):
            ax.axvline(k["at"], color="red", alpha=0.3)
    fig.suptitle(
        f"fleet scenario {result['scenario']}: {result['hpa']['metric_type']} "
        f"{result['hpa']['metric_name']}, target {result['hpa']['target_average_value']}, "
        f"time scale {result['time_scale']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
