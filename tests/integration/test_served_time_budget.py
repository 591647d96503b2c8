"""A request's time budget and the prompt-embedding cache, seen from outside a real server: the
response's Timings, the `request done` log line, sdxl_request_phase_seconds and the cache's counters."""

from __future__ import annotations

from sdxl_client._proto.sdxl.v1 import sdxl_pb2
from sdxl_server.service.time_budget import PHASES
from sdxl_test_support.grpc_details import decode, image_stub
from sdxl_test_support.metrics_page import metric_samples, sample


def _generate(stub, request_id: str) -> sdxl_pb2.GenerateResponse:
    request = sdxl_pb2.GenerateRequest(
        prompt="a time budget test of a green sphere", negative_prompt="blurry", seed=11, steps=2,
        request_id=request_id,
    )  # fmt: skip
    return stub.Generate(request, timeout=120)


def test_timings_log_and_metrics_carry_the_budget_and_a_repeated_prompt_is_not_encoded(shared_server):
    before = metric_samples(shared_server.scrape_metrics())
    with shared_server.channel() as channel:
        stub = image_stub(channel)
        first = _generate(stub, "budget-first")
        second = _generate(stub, "budget-second")
    t = first.timings
    for name in ("admission", "tokenize", "text_encode", "decode", "image_encode", "total"):
        assert getattr(t, f"{name}_seconds") > 0, name
    assert t.to_host_seconds >= 0 and t.queue_seconds >= 0 and t.denoise_seconds > 0
    # The same prompts again: the prompt-embedding cache holds them, the text encoders do not run.
    assert second.timings.text_encode_seconds == 0 and second.timings.tokenize_seconds > 0
    assert decode(first.images[0]).tobytes() == decode(second.images[0]).tobytes()

    entry = shared_server.wait_for_log_entry(
        lambda e: e.get("event") == "done" and e.get("request_id") == "budget-second"
    )
    assert {f"{phase}_s" for phase in PHASES} <= set(entry)
    assert entry["text_encode_s"] == 0

    after = metric_samples(shared_server.scrape_metrics())
    for phase in PHASES:
        counted = sample(after, "sdxl_request_phase_seconds_count", phase=phase)
        assert counted - sample(before, "sdxl_request_phase_seconds_count", phase=phase) >= 2, phase
    assert sample(after, "sdxl_prompt_cache_hits_total") - sample(before, "sdxl_prompt_cache_hits_total") >= 1
    misses = "sdxl_prompt_cache_misses_total"
    assert sample(after, misses) - sample(before, misses) >= 1
