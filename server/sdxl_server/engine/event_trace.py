"""The engine's event trace: a bounded, in-memory record of what the step loop did, in order.

Tests assert on this order (admissions, step boundaries, finishes, cancellations) instead of on wall-clock
time; operators can read it to see how requests shared the batch.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import threading


class TraceKind(enum.StrEnum):
    """What happened; exactly the kinds the engine emits (a str: `event.kind == "step"` holds)."""

    SUBMIT = "submit"  # a request was queued (the caller's thread)
    ENCODE = "encode"  # a request's prompts went through the text encoders (not on a prompt cache hit)
    ADMIT = "admit"  # an image entered a slot; detail: its resolution
    REARRANGE = "rearrange"  # a bank was packed and finished latents moved to its held buffer
    DECODE = "decode"  # a bank's held images were decoded; detail: resolution, batch, images
    STEP = "step"  # a step dispatch; detail: k, busy slots, batch per bank
    FINISH = "finish"  # an image ran its last step
    CANCEL = "cancel"  # an image left its slot or the queue: its request was cancelled
    EXPIRE = "expire"  # ... its request's deadline passed
    DROP = "drop"  # ... its request had already ended elsewhere (e.g. an engine failure)


@dataclasses.dataclass(frozen=True)
class TraceEvent:
    kind: TraceKind
    # Step boundary at which it happened: the number of step dispatches made so far.
    boundary: int
    request_id: str = ""
    image: int = -1
    slot: int = -1
    detail: str = ""


class EventTrace:
    def __init__(self, capacity: int) -> None:
        self._events: collections.deque[TraceEvent] = collections.deque(maxlen=max(capacity, 1))
        self._enabled = capacity > 0
        self._lock = threading.Lock()

    def add(self, event: TraceEvent) -> None:
        if self._enabled:
            with self._lock:
                self._events.append(event)

    def events(self) -> list[TraceEvent]:
        with self._lock:
            return list(self._events)
