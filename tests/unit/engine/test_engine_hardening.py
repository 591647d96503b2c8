"""The engine half of hardening: a bounded tokenizer, one owner for the queue, estimates from what the
step loop measured and published (their values, not only their sign)."""

from __future__ import annotations

import random
import string
import threading

import numpy as np
import pytest
from engine_helpers import SQUARE, WAIT_SECONDS, Recorder, request
from sdxl_server.engine.api import Failed, QueueFullError
from sdxl_server.engine.batching.admission_queue import AdmissionQueue
from sdxl_server.engine.batching.tracked_request import TrackedRequest
from sdxl_server.engine.models.loader import readable_prefix
from sdxl_server.engine.stats import MAX_RETRY_SECONDS, MIN_RETRY_SECONDS, StatsBoard

_NO_TOKENS = np.zeros((2, 2, 4), np.int32)  # token ids the queue never reads; they key the prompt cache


def test_a_huge_prompt_reaches_the_tokenizer_as_a_bounded_prefix_with_the_same_ids(engine):
    model = engine._model
    prefix, cut = readable_prefix("🦊" * 16384, model.max_tokens)
    assert cut and len(prefix) <= model.max_tokens * 16 + model.max_tokens
    # What the model reads is unchanged: the full text tokenized by the library gives the same ids.
    text = "🦊" * 2000
    ids, truncated = model.tokenize(text)
    for row, tokenizer in zip(ids, (model.pipeline.tokenizer, model.pipeline.tokenizer_2), strict=True):
        expected = tokenizer(text, padding="max_length", max_length=model.max_tokens, truncation=True)
        assert list(row) == expected.input_ids
    assert truncated


def test_whitespace_and_long_words_do_not_change_what_the_model_reads(engine):
    model = engine._model
    for text in ("a   photo\n of\ta cat ", "x" * 100, "y" * 76 + " z", " " * 5000 + "a late word"):
        ids, _ = model.tokenize(text)
        expected = model.pipeline.tokenizer(
            text, padding="max_length", max_length=model.max_tokens, truncation=True
        )
        assert list(ids[0]) == expected.input_ids, text[:20]


def test_prompts_of_many_distinct_words_do_not_grow_the_tokenizers_word_cache(engine):
    model = engine._model
    rng = random.Random(0)
    for _ in range(30):
        words = ("".join(rng.choices(string.ascii_lowercase, k=5)) for _ in range(250))
        model.tokenize(" ".join(words))
    for tokenizer in (model.pipeline.tokenizer, model.pipeline.tokenizer_2):
        assert len(tokenizer.cache) <= 4096 + 2


def test_the_idle_estimate_is_the_measured_step_time_of_its_resolution(engine):
    stats = engine.stats()
    step = stats.step_seconds_by_resolution[str(SQUARE)]
    assert step > 0
    assert engine.estimate_seconds(1, 4, SQUARE) == pytest.approx(4 * step + stats.decode_seconds_ewma)


def test_the_retry_delay_is_when_the_running_batch_frees_its_slots(static_engine):
    """Static policy, one request of 20 steps running: a queue place opens when it has finished, 19
    steps after its first; the delay a full queue answers with is those steps at the published step time."""
    release = threading.Event()
    running = Recorder(on_progress=lambda _: release.wait(WAIT_SECONDS))
    tickets = [static_engine.submit(request("retry-running", seed=1, steps=20), running)]
    waiting = []
    try:
        while not any(e.kind == "step" and e.request_id == "" for e in static_engine.trace()[-3:]):
            release.wait(0.01)  # polls the trace until the first step was dispatched; then it is held
        queue = static_engine.config.max_queue
        for i in range(queue // 4):
            recorder = Recorder()
            tickets.append(static_engine.submit(request(f"retry-wait-{i}", num_images=4), recorder))
            waiting.append(recorder)
        with pytest.raises(QueueFullError) as refused:
            static_engine.submit(request("retry-refused"), Recorder())
        stats = static_engine.stats()
        expected = min(max(stats.step_seconds_ewma * 19, MIN_RETRY_SECONDS), MAX_RETRY_SECONDS)
        assert stats.queue_depth == queue
        assert refused.value.retry_after_seconds == pytest.approx(expected)
        assert stats.retry_after_seconds == pytest.approx(expected)
    finally:
        for ticket in tickets:
            static_engine.cancel(ticket)
        release.set()
    for recorder in [running, *waiting]:
        assert isinstance(recorder.wait(), Failed)


def test_queued_images_are_judged_once_when_the_loop_retires_them():
    board = StatsBoard(slots_total=1)
    queue = AdmissionQueue(max_images=8, board=board)
    tracked = [
        TrackedRequest(request(f"q{i}", num_images=2), lambda _: None, _NO_TOKENS, True, 0.0)
        for i in range(3)
    ]
    for item in tracked:
        queue.put(item, lambda: 1.0, lambda _: None)
    assert board.waiting() == 6 and len(queue) == 0  # accepted at once; the loop has not received them
    queue.receive()
    calls = []

    def doomed(item) -> bool:
        calls.append(item)
        return item.request is tracked[1]

    removed = queue.remove_where(doomed)
    assert len(calls) == 6 and [i.request for i in removed] == [tracked[1]] * 2 and len(queue) == 4
