"""Measures the device from the host without ever stalling the step loop.

The step loop dispatches asynchronously and hands each dispatch's small output here; one watcher thread
waits for them in dispatch order. A dispatch's device time runs from when the device could start it (its
dispatch, or the previous one's completion, whichever is later) to its completion. From these the clock
keeps the step time, the decode time, the share of recent wall time the device was busy, and the number
of dispatches in flight, which the step loop bounds so that it never runs far ahead of the device.
"""

from __future__ import annotations

import bisect
import collections
import math
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import jax

# A dispatch's output, kind, steps, key, dispatch time and who is told its device seconds.
_Tracked = tuple[Any, str, int, str, float, Callable[[float], None] | None]
_EWMA_WEIGHT = 0.2  # weight of the newest measurement
# Upper bounds (seconds) of the step-duration histogram (sdxl_step_duration_seconds): a tiny model on a CPU
# takes milliseconds per step, SDXL on a TPU v5e chip about 0.1 s.
STEP_SECONDS_BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class DeviceClock:
    def __init__(self, window_seconds: float, on_error: Callable[[BaseException], None]) -> None:
        self._window = window_seconds
        self._on_error = on_error
        self._pending: queue.Queue[_Tracked | None] = queue.Queue()
        self._in_flight = 0
        self._changed = threading.Condition()
        self._last_done = 0.0
        self._busy: collections.deque[tuple[float, float]] = collections.deque()
        # Busy spans in the window and their total, kept together (one tuple, replaced atomically), so
        # that busy_ratio, read at every boundary, costs O(spans straddling the horizon), not O(window).
        self._busy_state: tuple[tuple[tuple[float, float], ...], float] = ((), 0.0)
        self._busy_total = 0.0  # the watcher thread's running sum of the spans in self._busy
        self._first_start: float | None = None
        self.busy_seconds_total = 0.0
        self.step_seconds_ewma = 0.0
        self.step_seconds_by_key: dict[str, float] = {}  # per resolution: what a step there costs
        self.decode_seconds_ewma = 0.0
        self._step_counts = [0] * (len(STEP_SECONDS_BOUNDS) + 1)  # the last bucket is +Inf
        self._step_seconds_sum = 0.0
        self._thread = threading.Thread(target=self._watch, name="sdxl-device-clock", daemon=True)
        self._thread.start()

    def track(
        self,
        done: Any,
        kind: str,
        steps: int = 1,
        key: str = "",
        on_measured: Callable[[float], None] | None = None,
    ) -> None:
        """Registers a dispatch; `done` is any output array of it. kind: 'step' (of `steps` steps, for
        `key`, e.g. a resolution), 'decode', or anything else. `on_measured`, if given, is told the
        dispatch's device seconds on the watcher's thread (a request's time budget)."""
        with self._changed:
            self._in_flight += 1
        self._pending.put((done, kind, steps, key, time.monotonic(), on_measured))

    def wait_in_flight(self, at_most: int) -> None:
        with self._changed:
            self._changed.wait_for(lambda: self._in_flight <= at_most)

    def idle(self) -> bool:
        return self._in_flight == 0

    def busy_ratio(self) -> float:
        now = time.monotonic()
        horizon = now - self._window
        spans, total = self._busy_state
        busy = total
        for start, end in spans:  # oldest first: only the few that begin before the horizon are clipped
            if start >= horizon:
                break
            busy -= min(end, horizon) - start
        if self._first_start is None:
            return 0.0
        span = min(self._window, now - self._first_start)
        return min(1.0, busy / span) if span > 0 else 0.0

    def busy_seconds_since(self, since: float) -> float:
        """Device time after `since` (time.monotonic), within the window kept (busy_window_seconds)."""
        return sum(max(0.0, end - max(start, since)) for start, end in list(self._busy))

    def step_histogram(self) -> tuple[list[tuple[float, int]], float]:
        """Device seconds per batched step: cumulative (upper bound, count) pairs ending with +inf, and
        the sum of the observed seconds. A dispatch of K steps counts as K steps of 1/K of its time."""
        counts, total = list(self._step_counts), self._step_seconds_sum
        cumulative, running = [], 0
        for bound, count in zip((*STEP_SECONDS_BOUNDS, math.inf), counts, strict=True):
            running += count
            cumulative.append((bound, running))
        return cumulative, total

    def stop(self) -> None:
        self._pending.put(None)
        self._thread.join(timeout=30)

    def _watch(self) -> None:
        while (entry := self._pending.get()) is not None:
            done, kind, steps, key, dispatched_at, on_measured = entry
            try:
                jax.block_until_ready(done)
            except Exception as error:  # the device failed: nothing after this can be trusted
                self._on_error(error)
            finished_at = time.monotonic()
            started_at = max(dispatched_at, self._last_done)
            self._last_done = finished_at
            self._record(started_at, finished_at, kind, steps, key)
            if on_measured is not None:
                on_measured(finished_at - started_at)
            with self._changed:
                self._in_flight -= 1
                self._changed.notify_all()

    def _record(self, started_at: float, finished_at: float, kind: str, steps: int, key: str) -> None:
        seconds = finished_at - started_at
        if self._first_start is None:
            self._first_start = started_at
        self.busy_seconds_total += seconds
        self._busy.append((started_at, finished_at))
        dropped = 0.0
        while self._busy and self._busy[0][1] < finished_at - self._window:
            start, end = self._busy.popleft()
            dropped += end - start
        self._busy_total += seconds - dropped
        self._busy_state = (tuple(self._busy), self._busy_total)
        if kind == "step":
            per_step = seconds / steps
            old = self.step_seconds_ewma
            self.step_seconds_ewma = per_step if old == 0 else old + _EWMA_WEIGHT * (per_step - old)
            if key:  # replaced, not updated in place: other threads read it without a lock
                old_here = self.step_seconds_by_key.get(key, 0.0)
                new_here = per_step if old_here == 0 else old_here + _EWMA_WEIGHT * (per_step - old_here)
                self.step_seconds_by_key = {**self.step_seconds_by_key, key: new_here}
            self._step_counts[bisect.bisect_left(STEP_SECONDS_BOUNDS, per_step)] += steps
            self._step_seconds_sum += seconds
        elif kind == "decode":
            old = self.decode_seconds_ewma
            self.decode_seconds_ewma = seconds if old == 0 else old + _EWMA_WEIGHT * (seconds - old)

    def seed_estimates(
        self, step_seconds: float, decode_seconds: float, by_key: dict[str, float] | None = None
    ) -> None:
        """Initial estimates from the warm-up runs, before any traffic."""
        self.step_seconds_ewma = step_seconds
        self.decode_seconds_ewma = decode_seconds
        self.step_seconds_by_key = dict(by_key or {})
