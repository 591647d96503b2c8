"""A bounded, in-memory record of what the step loop did, in order.

Tests assert on this order (admissions, step boundaries, finishes, cancellations) instead of on wall-clock
time; operators can read it to see how requests shared the batch.
"""

from __future__ import annotations

import collections
import dataclasses
import threading


@dataclasses.dataclass(frozen=True)
class TraceEvent:
    # submit | admit | step | finish | cancel | expire | reject
    kind: str
    # Step boundary at which it happened: the number of step dispatches made so far.
    boundary: int
    request_id: str = ""
    image: int = -1
    slot: int = -1
    detail: str = ""


class Trace:
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
