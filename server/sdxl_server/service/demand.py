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
The step time is that of a full batch (``FullBatchSteps``): the engine's recent step time follows the
occupancy (fewer busy slots run a smaller, faster program), and with it a pod at 75% of its slots would
price its work at 75% and demand would fall as pods are added; the fleet harness showed the sum of
demand over three pods reading 1.3-1.5 for 2.4 pods' worth.

Device seconds alone still miss the host's share of a slot's time (dispatch, tokenizing, decode hand-off,
encoding responses: on the harness's CPU-limited pods under load, most of it), so a saturated pod's
price is its measured throughput instead: wall seconds between two saturated snapshots x slots / the
image-steps completed in between, the seconds one image-step really held a slot (``Throughput``). A pod
that serves N image-steps a second at capacity then reads exactly arrivals / N.

A pod that is not saturated has no such interval: new pods at 80% of their capacity kept the device's
price and read about half their demand (the fleet's sum read 2.1-2.26 for 2.4 pods' worth, inside the
HPA's tolerance, so the spare pod the headroom rule asks for was never added). So the price is also
learnt at any occupancy, from the requests that finished (``SlotTime``): an image's denoising holds its
slot from admission to its last step, host work and the CPU it shares included, so the slot-seconds of
the requests served in the window over their image-steps is what an image-step costs now. The price of a
resolution is the largest of the three figures: the device's full batch, the saturated throughput, the
served requests' slot time (a partly busy pod runs smaller programs and shares less CPU, so its slot time
is a floor of the saturated price, never more).

Wall time below saturation still misses what saturates a CPU-limited pod: with free CPU under its quota a
partly busy pod steps at full speed (the standard run's pods at 60% read 0.25-0.36 pods for 0.6 with the
slot time alone), and only at saturation does the quota stretch every step. So the pod's CPU is priced as
a resource of its own (``CpuPrice``): the process's CPU seconds per image-step done, at any occupancy,
over the CPUs its cgroup allows (service/cpu_limit.py): ``slots x CPU seconds per image-step / CPUs`` is
what an image-step costs a pod whose CPU is the bottleneck. A pod's capacity is bounded by each of its
resources, so the price is the larger of the device's and the CPU's: on a TPU host with CPUs to spare
the device's; on the harness's 0.3-CPU pods the CPU's. Without a quota there is no CPU price.
Measured at the pod's occupancy, that CPU price reads 1.3-1.6x a full pod's below saturation (a batched
step's fixed CPU shared by fewer image-steps; the standard run's fleet asked for 6 pods for 3), so where
the engine counts its batched steps, a line fitted over recent scrape intervals (service/cpu_line.py)
gives a full pod's CPU per batched step, and the per-image-step figure stays the fallback.

Only first attempts count (``ATTEMPT_HEADER``, sent by sdxl_client on both doors): a retry was counted
where its first attempt arrived, refused or not, and counting it again on every pod it reaches made a
saturated fleet read its retries as demand. A request without the header counts once per request id.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable, Mapping

from sdxl_server.engine.api import EngineStats, GenerationRequest
from sdxl_server.service.cpu_limit import cpu_limit
from sdxl_server.service.cpu_line import CpuInterval, CpuLine

# Request ids remembered to count a retry once: far more than a window's arrivals at any rate a pod sees.
_MAX_REMEMBERED_IDS = 100_000

# The attempt number a client sends with each call (gRPC metadata on the gRPC door, an HTTP header on
# the HTTP door; header names are case-insensitive there): 1 for the first attempt. Clients that send
# none are taken as first attempts. sdxl_client has its own copy (it does not import the server).
ATTEMPT_HEADER = "x-sdxl-attempt"

# Smoothing of the measured throughput: each saturated interval moves the price this share of the way.
_THROUGHPUT_WEIGHT = 0.3


def parse_attempt(value: str | None) -> int:
    """The attempt number in an ``x-sdxl-attempt`` value (None: absent, a first attempt).

    Raises ValueError naming the header when it is not a positive integer."""
    if value is None or value == "":
        return 1
    try:
        attempt = int(value)
    except ValueError:
        attempt = 0
    if attempt < 1:
        raise ValueError(f"{ATTEMPT_HEADER} must be a positive integer (the attempt number), got {value!r}")
    return attempt


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


class FullBatchSteps:
    """The step time of a full batch, per resolution: what an image-step costs a pod at its capacity.

    Taken from the engine's first measurement (its warm-up times a full bank of every resolution before
    any traffic) and again whenever every slot is busy, when the recent step time is a full batch's.
    """

    def __init__(self) -> None:
        self._by_resolution: dict[str, float] = {}
        self._overall = 0.0

    def update(self, stats: EngineStats) -> None:
        saturated = stats.slots_total > 0 and stats.slots_busy >= stats.slots_total
        for resolution, seconds in stats.step_seconds_by_resolution.items():
            if seconds > 0 and (saturated or resolution not in self._by_resolution):
                self._by_resolution[resolution] = seconds
        if stats.step_seconds_ewma > 0 and (saturated or self._overall == 0):
            self._overall = stats.step_seconds_ewma

    @property
    def by_resolution(self) -> Mapping[str, float]:
        return self._by_resolution

    @property
    def overall(self) -> float:
        return self._overall


class Throughput:
    """Measured wall seconds one image-step holds a slot at saturation, relative to the device's step time.

    Between two snapshots that both have every slot busy, the slots were busy throughout (near enough: a
    slot freed between two scrapes is refilled from the queue at the next boundary), so
    ``elapsed x slots / image-steps completed`` is what an image-step costs a saturated pod, host work
    included. ``factor`` is that over the full batch's device step time: the price of every resolution is
    its device step time x factor (one factor: the host's share is per step, not per resolution, to a
    first approximation). 1.0 until a saturated interval was measured.
    """

    def __init__(self) -> None:
        self._last: tuple[float, int] | None = None  # (when, steps_total) of the last saturated snapshot
        self.factor = 1.0

    def update(self, stats: EngineStats, now: float, device_step_seconds: float) -> None:
        saturated = stats.slots_total > 0 and stats.slots_busy >= stats.slots_total
        if not saturated:
            self._last = None
            return
        last, self._last = self._last, (now, stats.steps_total)
        if last is None or device_step_seconds <= 0:
            return
        elapsed, completed = now - last[0], stats.steps_total - last[1]
        if elapsed <= 0 or completed < stats.slots_total:  # not even one full step between the snapshots
            return
        wall = elapsed * stats.slots_total / completed
        measured = wall / device_step_seconds
        self.factor += _THROUGHPUT_WEIGHT * (measured - self.factor)


@dataclasses.dataclass(frozen=True)
class Served:
    at: float  # monotonic seconds
    images: int
    image_steps: int  # images x steps
    resolution: str
    denoise_seconds: float  # Finished.denoise_seconds: the first image entering a slot to the last denoised


class SlotTime:
    """Wall seconds one image-step held a slot, per resolution, from the requests served in the window.

    A request's images hold ``min(images, slots)`` slots for its denoising time (images beyond the slots
    wait for a second round, which its denoising time then also covers), so its slot-seconds are
    ``denoise_seconds x min(images, slots)`` for ``images x steps`` image-steps. Measured at any
    occupancy; the last figure of a resolution stays until requests of it are served again.
    """

    def __init__(self) -> None:
        self._served: collections.deque[Served] = collections.deque()
        self._by_resolution: dict[str, float] = {}
        self._overall = 0.0

    def add(self, served: Served, window_start: float) -> None:
        while self._served and self._served[0].at < window_start:
            self._served.popleft()
        self._served.append(served)

    def update(self, window_start: float, slots: int) -> None:
        slot_seconds: dict[str, float] = collections.defaultdict(float)
        image_steps: dict[str, int] = collections.defaultdict(int)
        for s in list(self._served):
            if s.at >= window_start and s.image_steps > 0:
                slot_seconds[s.resolution] += s.denoise_seconds * min(s.images, max(slots, 1))
                image_steps[s.resolution] += s.image_steps
        for resolution, steps in image_steps.items():
            self._by_resolution[resolution] = slot_seconds[resolution] / steps
        if image_steps:
            self._overall = sum(slot_seconds.values()) / sum(image_steps.values())

    @property
    def by_resolution(self) -> Mapping[str, float]:
        return self._by_resolution

    @property
    def overall(self) -> float:
        return self._overall


class CpuPrice:
    """Slot-seconds one image-step costs a pod whose CPU limit is its bottleneck, from the CPU it spent.

    Between two readings with at least a full step's worth of image-steps done, ``slots x CPU seconds
    used / image-steps done / CPUs allowed``, smoothed like ``Throughput``. CPU the pod spends idle
    (health checks, scrapes) is charged to the image-steps done with it, so a quiet pod's price reads
    high, but its demand, arrivals x price, then reads what its CPU is used for, which stays small.
    That figure is measured at the pod's occupancy, and a batched step's fixed CPU divided among fewer
    image-steps makes it an upper bound of a full pod's price (1.3-1.6x below saturation). Where the
    batched steps are counted too, each interval is also a point of ``CpuLine`` (service/cpu_line.py),
    whose fitted line at full occupancy is the price once it is determined.
    0 until measured, and where the process has no CPU limit.
    """

    def __init__(self) -> None:
        # (CPU seconds, steps_total, batched steps or None) at the last reading
        self._last: tuple[float, int, int | None] | None = None
        self._upper = 0.0  # the per-image-step figure at the pods' occupancy, smoothed
        self._line = CpuLine()
        self._fitted: float | None = None

    @property
    def seconds(self) -> float:
        return self._upper if self._fitted is None else self._fitted

    def update(
        self,
        cpu_seconds: float,
        steps_total: int,
        slots: int,
        cpus: float | None,
        batched_steps: int | None = None,
    ) -> None:
        """``batched_steps``: batched steps run so far (None: not counted, the upper bound alone)."""
        last = self._last
        if last is not None and steps_total - last[1] < max(slots, 1):
            return  # too few image-steps to divide by yet: keep accumulating from the same reading
        self._last = (cpu_seconds, steps_total, batched_steps)
        if last is None or cpus is None or cpus <= 0 or slots <= 0:
            return
        used, done = cpu_seconds - last[0], steps_total - last[1]
        if used <= 0:
            return
        measured = slots * used / done / cpus
        self._upper = (
            measured if self._upper == 0 else self._upper + _THROUGHPUT_WEIGHT * (measured - self._upper)
        )
        if batched_steps is not None and last[2] is not None:
            self._line.add(CpuInterval(used, done, batched_steps - last[2]))
        fitted = self._line.price(slots, cpus)
        # Never above the upper bound: the line and the smoothed figure cover different spans.
        self._fitted = None if fitted is None else min(fitted, self._upper)


def histogram_count(histogram: tuple[list[tuple[float, int]], float] | None) -> int | None:
    """Observations in a cumulative histogram (``JaxEngine.step_histogram``: buckets ending with +inf,
    and their sum): the batched steps run. None where there is none."""
    if histogram is None or not histogram[0]:
        return None
    return histogram[0][-1][1]


class DemandMeter:
    """Arrivals are recorded from the event loop's thread (Admission.check); ``value`` is read by the
    metrics collector at scrape time from the metrics server's thread: both take no lock, because
    ``deque.append``/``popleft`` are atomic and ``value`` reads a copy. Served requests (``served``) are
    recorded from the event loop's thread too."""

    def __init__(
        self,
        window_seconds: float,
        clock: Callable[[], float] = time.monotonic,
        cpu_clock: Callable[[], float] = time.process_time,
        cpus: Callable[[], float | None] = cpu_limit,
        batched_steps: Callable[[], int | None] = lambda: None,
    ) -> None:
        """``cpu_clock``: the process's CPU seconds; ``cpus``: the CPUs it may use (None: no limit), read
        at every scrape (a pod's process may be moved into its cgroup after it starts);
        ``batched_steps``: batched steps run so far (None: not counted), for the CPU's fitted line."""
        if window_seconds <= 0:
            raise ValueError(f"demand_window_seconds must be positive, got {window_seconds}")
        self.window_seconds = window_seconds
        self._clock = clock
        self._arrivals: collections.deque[Arrival] = collections.deque()
        self._seen: collections.OrderedDict[str, float] = collections.OrderedDict()  # request id -> when
        self._full_batch = FullBatchSteps()
        self._throughput = Throughput()
        self._slot_time = SlotTime()
        self._cpu_clock = cpu_clock
        self._cpus = cpus
        self._cpu_price = CpuPrice()
        self._batched_steps = batched_steps

    def arrived(self, request: GenerationRequest, attempt: int = 1) -> None:
        """One validated request reached the admission checks (whatever they decide); ``attempt``: the
        client's attempt number (``ATTEMPT_HEADER``). Retries (attempt > 1) are not counted."""
        now = self._clock()
        self._forget_before(now - self.window_seconds)
        if attempt > 1:
            return  # counted where its first attempt arrived
        if request.request_id:
            if request.request_id in self._seen:
                return  # a retry of work already counted in this window
            self._seen[request.request_id] = now
            if len(self._seen) > _MAX_REMEMBERED_IDS:
                self._seen.popitem(last=False)
        steps = request.num_images * request.steps
        self._arrivals.append(Arrival(now, steps, str(request.resolution)))

    def served(self, request: GenerationRequest, denoise_seconds: float) -> None:
        """``request`` finished; its images were denoised in ``denoise_seconds`` (``Finished``)."""
        now = self._clock()
        steps = request.num_images * request.steps
        served = Served(now, request.num_images, steps, str(request.resolution), denoise_seconds)
        self._slot_time.add(served, now - self.window_seconds)

    def value(self, stats: EngineStats) -> float:
        """``sdxl_demand`` now, with the full-batch step times learnt from ``stats`` (and its slots).
        Called from one thread (the metrics collector's), which alone updates the step times."""
        now = self._clock()
        self._full_batch.update(stats)
        self._throughput.update(stats, now, self._full_batch.overall)
        self._cpu_price.update(
            self._cpu_clock(), stats.steps_total, stats.slots_total, self._cpus(), self._batched_steps()
        )
        factor = self._throughput.factor
        if self._full_batch.overall > 0:  # the CPU's price as a factor over the device's, as Throughput's
            factor = max(factor, self._cpu_price.seconds / self._full_batch.overall)
        start = now - self.window_seconds
        self._slot_time.update(start, stats.slots_total)
        served = self._slot_time.by_resolution
        prices = {
            resolution: seconds * factor for resolution, seconds in self._full_batch.by_resolution.items()
        }
        for resolution, seconds in served.items():
            prices[resolution] = max(prices.get(resolution, 0.0), seconds)
        # Before the engine measured a step nothing is priced (demand 0), whatever was served.
        overall = self._full_batch.overall * factor
        if overall > 0:
            overall = max(overall, self._slot_time.overall)
        recent = [a for a in list(self._arrivals) if a.at >= start]
        return demand(recent, self.window_seconds, prices, overall, stats.slots_total)

    def _forget_before(self, start: float) -> None:
        while self._arrivals and self._arrivals[0].at < start:
            self._arrivals.popleft()
        while self._seen:
            oldest_id, at = next(iter(self._seen.items()))
            if at >= start:
                break
            del self._seen[oldest_id]
