"""The rejection log (sdxl_server.service.request_log): the first of a kind at once, then one summary."""

from __future__ import annotations

import logging

import grpc
from sdxl_server.service.request_log import RejectionLog
from sdxl_server.service.status_mapping import ServiceError, invalid_argument


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_rejections_first_of_a_kind_at_once_then_one_summary(caplog):
    clock = _Clock()
    rejections = RejectionLog(window_seconds=10.0, clock=clock)
    bad_steps = invalid_argument([("steps", "99 is outside 1..50")])
    full = ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, "admission queue full")
    with caplog.at_level(logging.INFO, logger="sdxl_server.requests"):
        for error in [bad_steps] * 500 + [full] * 3 + [invalid_argument([("width", "not served")])]:
            rejections.record(error)
        shown = [r.getMessage() for r in caplog.records]
        assert len(shown) == 3  # one line per kind, however many arrive
        assert shown[0].startswith("request rejected: INVALID_ARGUMENT: steps: 99 is outside 1..50")
        clock.now += 10.0
        rejections.record(full)  # a new window: the last one's counts go out first
    summary = caplog.records[3]
    assert summary.getMessage().startswith(
        "501 more requests rejected in the last 10 s: INVALID_ARGUMENT 499"
    )
    assert summary.fields["counts"] == {"INVALID_ARGUMENT": 499, "RESOURCE_EXHAUSTED": 2}  # type: ignore[attr-defined]
    assert caplog.records[4].getMessage().startswith("request rejected: RESOURCE_EXHAUSTED")
