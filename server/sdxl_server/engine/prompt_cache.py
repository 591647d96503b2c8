"""The prompt-embedding cache: text-encoder outputs kept on the device, keyed by the prompts' token ids.

A shared negative prompt, a repeated prompt, or many requests for images of one prompt are encoded once:
admission (step_loop.py) looks the key up before it would run the `encode` program, and a hit inserts the
cached embeddings into the slot unchanged, so the images are exactly those an encode would give (the
same program's output, reused). Least recently used entries leave first, bounded both in entries and in
device bytes. Owned by the step loop's thread alone: no lock; the hit and miss counts are plain integers
other threads only read.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class PromptKey:
    """What the text encoders' output depends on. A small value: compared and hashed, never mutated.
    Something else that changes the encoders' output becomes another field, as LoRA adapters on them did."""

    prompt_ids: bytes  # the prompt's token ids for both tokenizers, int32 bytes
    negative_ids: bytes  # the negative prompt's, likewise
    zero_negative: bool  # an empty negative prompt: zero embeddings, whatever its ids encode to
    # The request's LoRA adapters that change a text encoder, with their scales (RequestAdapters).
    adapters: tuple[tuple[Any, float], ...] = ()

    @classmethod
    def of(cls, token_ids: np.ndarray, zero_negative: bool) -> PromptKey:
        """From int32[2 (negative, prompt), encoders, tokens] as the engine tokenizes a request."""
        ids = np.ascontiguousarray(token_ids, dtype=np.int32)
        return cls(prompt_ids=ids[1].tobytes(), negative_ids=ids[0].tobytes(), zero_negative=zero_negative)


class PromptCache:
    """LRU of device embeddings; `max_entries` 0 turns it off (every lookup is then a miss, not counted)."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: collections.OrderedDict[PromptKey, tuple[Any, int]] = collections.OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0 and self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: PromptKey) -> Any | None:
        if not self.enabled:
            return None
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry[0]

    def put(self, key: PromptKey, embeddings: Any) -> None:
        """Keeps `embeddings` (device arrays) under `key`, evicting the least recently used as needed;
        an entry larger than the whole budget is not kept."""
        if not self.enabled:
            return
        size = sum(int(array.nbytes) for array in _leaves(embeddings))
        if size > self.max_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= old[1]
        while self._entries and (
            len(self._entries) >= self.max_entries or self.bytes + size > self.max_bytes
        ):
            _, (_, evicted) = self._entries.popitem(last=False)
            self.bytes -= evicted
        self._entries[key] = (embeddings, size)
        self.bytes += size


def _leaves(embeddings: Any) -> list[Any]:
    return list(embeddings) if isinstance(embeddings, tuple | list) else [embeddings]
