"""The recording rule the HPA reads with ``autoscaling.headroom.idleSlots`` (``sdxl_demand_with_headroom``),
evaluated by ``promtool test rules`` on synthetic pods: ceil(value / targetDemand) must be the larger of
the target's share (sum of demand / target) and the demand plus the idle slots' worth of pods.

Defaults: targetDemand 0.7, idleSlots 4; the pods report 4 slots each, so the idle slots are one pod.
"""

from __future__ import annotations

import math
import pathlib
import subprocess

import pytest
import yaml
from monitoring_helpers import JOB, NAMESPACE, debian_tool, rule_groups, write_rules

TARGET, IDLE_SLOTS, SLOTS = 0.7, 4, 4


def _series(pods: list[float], warming: int) -> list[dict[str, str]]:
    series = []
    for i, demand in enumerate(pods):
        labels = f'job="{JOB}", namespace="{NAMESPACE}", instance="10.0.0.{i + 1}:8000"'
        series.append({"series": f"sdxl_demand{{{labels}}}", "values": f"{demand}x10"})
        series.append({"series": f"sdxl_slots_total{{{labels}}}", "values": f"{SLOTS}x10"})
    for i in range(warming):  # no demand sample yet, and no slots before the engine starts
        labels = f'job="{JOB}", namespace="{NAMESPACE}", instance="10.0.1.{i + 1}:8000"'
        series.append({"series": f"sdxl_slots_total{{{labels}}}", "values": "0x10"})
    return series


def _replicas(value: float) -> int:
    return math.ceil(round(value / TARGET, 9))


@pytest.mark.parametrize(
    ("pods", "warming", "replicas"),
    [
        ([0.6], 0, 2),  # quiet: one pod's worth is 0.86 pods at the target; the idle pod makes it 2
        ([2.4], 0, 4),  # a step to 2.4 pods' worth on one pod: 3.43 at the target, 3.4 with the idle pod
        ([0.8, 0.8, 0.8], 0, 4),  # the same work spread over 3 pods reads the same
        ([3.0, 3.0], 0, 9),  # heavy: the target's share (8.57) is above demand + idle pod (7)
        ([2.4], 3, 4),  # pods warming up (0 slots) do not shrink the slots per pod: still one idle pod
    ],
)
def test_the_recorded_series_gives_the_larger_of_target_and_idle_slots(
    tmp_path: pathlib.Path, pods: list[float], warming: int, replicas: int
) -> None:
    demand = sum(pods)
    expected = max(demand, TARGET * (demand + IDLE_SLOTS / SLOTS))
    assert _replicas(expected) == replicas  # the case says what it claims
    write_rules(tmp_path / "rules.yaml", rule_groups())
    tests = {
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "15s",
        "tests": [
            {
                "interval": "15s",
                "input_series": _series(pods, warming),
                "promql_expr_test": [
                    {
                        "expr": "sdxl_demand_with_headroom",
                        "eval_time": "1m",
                        "exp_samples": [
                            {
                                "labels": f'sdxl_demand_with_headroom{{job="{JOB}", '
                                f'namespace="{NAMESPACE}"}}',
                                "value": expected,
                            }
                        ],
                    }
                ],
            }
        ],
    }
    (tmp_path / "headroom.promtool.yaml").write_text(yaml.safe_dump(tests, sort_keys=False))
    command = [
        debian_tool("SDXL_PROMTOOL", "promtool"),
        "test",
        "rules",
        str(tmp_path / "headroom.promtool.yaml"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_recording_rule_without_idle_slots_or_on_load() -> None:
    for values in ({"autoscaling": {"headroom": {"idleSlots": 0}}}, {"autoscaling": {"metric": "load"}}):
        records = {r.get("record") for g in rule_groups(values=values) for r in g["rules"]}
        assert "sdxl_demand_with_headroom" not in records, values
