"""service/time_budget.py: the service's phases around the engine's, and the same figures everywhere."""

from __future__ import annotations

import pytest
from sdxl_server.engine import api
from sdxl_server.service.time_budget import PHASES, TimeBudget, timings_json

FINISHED = api.Finished(
    queue_seconds=0.5, denoise_seconds=2.0, total_seconds=3.0, tokenize_seconds=0.01,
    text_encode_seconds=0.02, decode_seconds=0.3, to_host_seconds=0.04, image_encode_seconds=0.05,
)  # fmt: skip


def test_admission_excludes_tokenizing_and_response_is_what_follows_the_engines_total():
    # Arrived at 10.0, submit returned at 10.11 (0.01 of it tokenizing), the request ended at 13.2.
    budget = TimeBudget.of(arrived=10.0, submitted=10.11, ended=13.2, finished=FINISHED)
    assert budget.seconds["admission"] == pytest.approx(0.10)
    assert budget.seconds["response"] == pytest.approx(3.2 - 0.10 - 3.0)
    assert budget.total_seconds == pytest.approx(3.2)
    assert set(budget.seconds) == set(PHASES)


def test_timings_log_fields_and_json_say_the_same_figures():
    budget = TimeBudget.of(arrived=0.0, submitted=0.11, ended=3.2, finished=FINISHED)
    timings = budget.timings()
    assert (timings.queue_seconds, timings.denoise_seconds, timings.total_seconds) == (0.5, 2.0, 3.0)
    assert (timings.tokenize_seconds, timings.decode_seconds) == (0.01, 0.3)
    assert timings.admission_seconds == pytest.approx(0.10)
    fields = budget.log_fields()
    assert fields["image_encode_s"] == 0.05 and fields["admission_s"] == 0.1
    assert timings_json(timings)["to_host_seconds"] == 0.04
    assert set(timings_json(timings)) >= {"admission_seconds", "text_encode_seconds", "total_seconds"}


def test_clock_skew_between_the_engine_and_the_service_never_gives_a_negative_phase():
    budget = TimeBudget.of(arrived=0.0, submitted=0.005, ended=2.9, finished=FINISHED)
    assert min(budget.seconds.values()) >= 0
