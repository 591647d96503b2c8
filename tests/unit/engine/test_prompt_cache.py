"""The prompt-embedding cache: an LRU bounded in entries and bytes, keyed by token ids; through the real
engine, a cached prompt skips the text encoders (no encode in the trace) and gives the same image."""

from __future__ import annotations

import numpy as np
from engine_helpers import request, run
from sdxl_server.engine.api import Finished
from sdxl_server.engine.event_trace import TraceKind
from sdxl_server.engine.prompt_cache import PromptCache, PromptKey


def _key(prompt: int, negative: int = 0, zero_negative: bool = False) -> PromptKey:
    ids = np.zeros((2, 2, 4), np.int32)
    ids[1, :, 0], ids[0, :, 0] = prompt, negative
    return PromptKey.of(ids, zero_negative)


def _embeddings(nbytes: int) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros(nbytes - 4, np.uint8), np.zeros(1, np.float32)


def test_key_is_the_token_ids_of_both_prompts_and_the_zero_negative_rule():
    assert _key(1, 2) == _key(1, 2) and hash(_key(1, 2)) == hash(_key(1, 2))
    assert _key(1, 2) != _key(2, 1)
    assert _key(1, 2) != _key(1, 3)
    assert _key(1, 0, zero_negative=True) != _key(1, 0, zero_negative=False)


def test_least_recently_used_leaves_first_when_entries_are_full():
    cache = PromptCache(max_entries=2, max_bytes=1 << 20)
    cache.put(_key(1), _embeddings(100))
    cache.put(_key(2), _embeddings(100))
    assert cache.get(_key(1)) is not None  # 1 is now the most recent
    cache.put(_key(3), _embeddings(100))
    assert cache.get(_key(2)) is None and cache.get(_key(1)) is not None and cache.get(_key(3)) is not None
    assert (cache.hits, cache.misses, len(cache)) == (3, 1, 2)


def test_bytes_bound_evicts_and_too_large_entries_are_not_kept():
    cache = PromptCache(max_entries=10, max_bytes=250)
    cache.put(_key(1), _embeddings(100))
    cache.put(_key(2), _embeddings(100))
    cache.put(_key(3), _embeddings(100))  # 300 > 250: the oldest goes
    assert cache.get(_key(1)) is None and cache.bytes == 200
    cache.put(_key(4), _embeddings(251))
    assert cache.get(_key(4)) is None and cache.bytes == 200


def test_turned_off_it_keeps_and_counts_nothing():
    cache = PromptCache(max_entries=0, max_bytes=1 << 20)
    cache.put(_key(1), _embeddings(100))
    assert cache.get(_key(1)) is None and (cache.hits, cache.misses, len(cache)) == (0, 0, 0)


def _encodes(engine, request_id: str) -> int:
    return sum(1 for e in engine.trace() if e.kind is TraceKind.ENCODE and e.request_id == request_id)


def test_a_cached_prompt_skips_the_text_encoders_and_gives_the_same_image(engine):
    prompt = "a prompt only the prompt cache test asks for"
    before = engine.stats()
    first = run(engine, request("cache-miss", prompt=prompt, negative_prompt="blurry", seed=5))
    second = run(engine, request("cache-hit", prompt=prompt, negative_prompt="blurry", seed=5))
    assert _encodes(engine, "cache-miss") == 1 and _encodes(engine, "cache-hit") == 0
    np.testing.assert_array_equal(first.images()[0], second.images()[0])  # same bucket: bit for bit
    missed, hit = first.events[-1], second.events[-1]
    assert isinstance(missed, Finished) and isinstance(hit, Finished)
    assert missed.text_encode_seconds > 0 and hit.text_encode_seconds == 0
    after = engine.stats()
    assert after.prompt_cache_hits - before.prompt_cache_hits >= 1
    assert after.prompt_cache_misses - before.prompt_cache_misses >= 1


def test_another_negative_prompt_is_encoded_again(engine):
    prompt = "a second prompt only the prompt cache test asks for"
    run(engine, request("cache-negative-a", prompt=prompt, negative_prompt="blurry"))
    run(engine, request("cache-negative-b", prompt=prompt, negative_prompt="dark"))
    assert _encodes(engine, "cache-negative-b") == 1


def test_finished_carries_the_engine_phases_of_the_time_budget(engine):
    end = run(engine, request("budget", prompt="a budget test prompt", num_images=2)).events[-1]
    assert isinstance(end, Finished)
    assert end.tokenize_seconds > 0 and end.text_encode_seconds > 0
    assert end.decode_seconds > 0 and end.image_encode_seconds > 0 and end.to_host_seconds >= 0
    assert end.queue_seconds + end.denoise_seconds <= end.total_seconds
