"""``sdxl_demand``: the pods' worth of work arriving at this server, refused arrivals included.

``sdxl_load`` = (images waiting + images in slots) / slots cannot exceed (max queue + slots) / slots: once
the queue is full, a pod reads that ceiling however much work it refuses, so an autoscaler on it sees "more"
but never "how much more", and adds pods a few at a time. Demand counts work as it arrives instead, before
the queue can refuse it:

    demand = image-steps arriving per second (over the last ``window_seconds``)
             x measured seconds one image-step holds a slot (the step time at the image's resolution)
             / slots

A pod that takes exactly what it can serve reads 1.0; a step to 2.4x its capacity reads 2.4 at once, so
``ceil(sum of demand / target)`` is the replica count in one decision. Every validated request counts,
also one refused for a full queue or an unreachable deadline: that is work the fleet was asked for.
A retry carries the request id of its first attempt: it counts once per window on each pod it reaches,
not once per attempt (a retry budget of 30 attempts would otherwise read as 30x the demand).
The step time is the engine's recent measure, which is smaller when few slots are busy (a smaller batch
runs faster), so at low load demand reads below the full-batch figure: it errs toward fewer pods only
where there is room.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable, Mapping

from sdxl_server.engine.api import EngineStats, GenerationRequest

# Request ids remembered to count a retry once: far more than a window's arrivals at any rate a pod sees.
_MAX_REMEMBERED_IDS = 100_000


@dataclasses.dataclass(frozen=True)
class Arrival:
    at: float  # monotonic seconds
    image_steps: int  # images x steps
    resolution: str  # "WxH", as EngineStats.step_seconds_by_resolution keys it


def demand(
    arrivals: list[Arrival],
    window_seconds: float,
    step_seconds_by_resolution: Mapping[str, float],
    step_seconds: float,
    slots: int,
) -> float:
    """Pods' worth of work in ``arrivals`` (those within the window): their slot-seconds per second of
    window, over the slots. A resolution not yet measured costs ``step_seconds`` (the engine's overall
    figure). 0 when the engine has measured nothing or has no slots."""
    if slots <= 0 or window_seconds <= 0:
        return 0.0
    slot_seconds = sum(
        a.image_steps * step_seconds_by_resolution.get(a.resolution, step_seconds) for a in arrivals
    )
    return slot_seconds / window_seconds / slots


class DemandMeter:
    """Arrivals are recorded from the event loop's thread (Admission.check); ``value`` is read by the
    metrics collector at scrape time from the metrics server's thread: both take no lock, because
    ``deque.append``/``popleft`` are atomic and ``value`` reads a copy."""

    def __init__(self, window_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        if window_seconds <= 0:
            raise ValueError(f"demand_window_seconds must be positive, got {window_seconds}")
        self.window_seconds = window_seconds
        self._clock = clock
        self._arrivals: collections.deque[Arrival] = collections.deque()
        self._seen: collections.OrderedDict[str, float] = collections.OrderedDict()  # request id -> when

    def arrived(self, request: GenerationRequest) -> None:
        """One validated request reached the admission checks (whatever they decide)."""
        now = self._clock()
        self._forget_before(now - self.window_seconds)
        if request.request_id:
            if request.request_id in self._seen:
                return  # a retry of work already counted in this window
            self._seen[request.request_id] = now
            if len(self._seen) > _MAX_REMEMBERED_IDS:
                self._seen.popitem(last=False)
        steps = request.num_images * request.steps
        self._arrivals.append(Arrival(now, steps, str(request.resolution)))

    def value(self, stats: EngineStats) -> float:
        """``sdxl_demand`` now, with the engine's measured step times and slots from ``stats``."""
        start = self._clock() - self.window_seconds
        recent = [a for a in list(self._arrivals) if a.at >= start]
        return demand(
            recent,
            self.window_seconds,
            stats.step_seconds_by_resolution,
            stats.step_seconds_ewma,
            stats.slots_total,
        )

    def _forget_before(self, start: float) -> None:
        while self._arrivals and self._arrivals[0].at < start:
            self._arrivals.popleft()
        while self._seen:
            oldest_id, at = next(iter(self._seen.items()))
            if at >= start:
                break
            del self._seen[oldest_id]
