"""The chart's alert and recording rules, checked by the real tools: ``promtool check rules`` and
``promtool test rules`` with unit tests (alerts.promtool.yaml) that make each alert fire on synthetic
series and stay silent on series just short of it."""

from __future__ import annotations

import pathlib
import shutil
import subprocess

import yaml
from monitoring_helpers import alert_names, debian_tool, render, rule_groups, write_rules

UNIT_TESTS = pathlib.Path(__file__).with_name("alerts.promtool.yaml")
ALERTS = {
    "SdxlReplicaNotReady",
    "SdxlNoReplicaReady",
    "SdxlHighErrorRatio",
    "SdxlQueueSaturated",
    "SdxlLatencyP99OverSLO",
    "SdxlAutoscalerAtMaxReplicas",
}


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    command = [debian_tool("SDXL_PROMTOOL", "promtool"), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def _unit_test(tmp_path: pathlib.Path, groups: list[dict]) -> subprocess.CompletedProcess[str]:
    write_rules(tmp_path / "rules.yaml", groups)  # the unit tests name rules.yaml, next to them
    shutil.copy(UNIT_TESTS, tmp_path / UNIT_TESTS.name)
    return _promtool("test", "rules", str(tmp_path / UNIT_TESTS.name))


def test_both_backends_get_the_same_rules_and_every_alert_is_there() -> None:
    gmp = rule_groups("gmp")
    assert gmp == rule_groups("prometheus-adapter")
    assert alert_names(gmp) == ALERTS


def test_promtool_accepts_the_rules(tmp_path) -> None:
    result = _promtool("check", "rules", str(write_rules(tmp_path / "rules.yaml", rule_groups())))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 14 rules found" in result.stdout


def test_every_alert_fires_and_stays_silent_in_the_promtool_unit_tests(tmp_path) -> None:
    result = _unit_test(tmp_path, rule_groups())
    assert result.returncode == 0, result.stdout + result.stderr
    # Each alert has a case where it fires and one where it must not.
    cases = [
        case for test in yaml.safe_load(UNIT_TESTS.read_text())["tests"] for case in test["alert_rule_test"]
    ]
    fired = {case["alertname"] for case in cases if case["exp_alerts"]}
    silent = {case["alertname"] for case in cases if not case["exp_alerts"]}
    assert fired == silent == ALERTS


def test_the_unit_tests_catch_a_wrong_threshold(tmp_path) -> None:
    # The unit tests are written for the defaults; an error ratio threshold of 50% must break them.
    result = _unit_test(tmp_path, rule_groups(values={"monitoring": {"rules": {"errorRatio": 0.5}}}))
    assert result.returncode != 0
    assert "SdxlHighErrorRatio" in result.stdout + result.stderr


def test_rules_follow_the_values(tmp_path) -> None:
    values = {"server": {"maxQueue": 10}, "autoscaling": {"enabled": False}}
    groups = rule_groups(values=values)
    assert "SdxlAutoscalerAtMaxReplicas" not in alert_names(groups)  # no HPA, nothing to be at max
    [queue] = [r for g in groups for r in g["rules"] if r.get("alert") == "SdxlQueueSaturated"]
    assert queue["expr"].endswith(">= 8")  # 0.8 of 10 images
    # No scraping object, no rules; and they can be turned off.
    for off in (
        {"metrics": {"backend": "none"}, "autoscaling": {"enabled": False}},
        # (idleSlots 0: the HPA's headroom series is a recording rule, so headroom needs the rules on)
        {"monitoring": {"rules": {"enabled": False}}, "autoscaling": {"headroom": {"idleSlots": 0}}},
    ):
        kinds = {m["kind"] for m in render(off)}
        assert not kinds & {"Rules", "PrometheusRule"}, off
