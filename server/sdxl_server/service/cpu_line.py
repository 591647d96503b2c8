"""A CPU-limited pod's CPU per batched step at full occupancy, fitted over recent scrape intervals.

A batched step costs the host a fixed share (dispatch, the padded program's bookkeeping, the scrapes and
idle threads it shares the interval with) plus a share per busy slot (the slot's image-step: its
latents, its completion, its response). Measured on the fleet's 0.3-CPU pods (docs/AUTOSCALING.md,
"Where a partly busy pod's CPU goes"): about 0.005 CPU seconds fixed plus 0.005 per busy slot. So the
CPU seconds per image-step measured at the occupancy a pod runs at read 1.3-1.6x a full pod's below
saturation (the fixed share divided among fewer image-steps), and the HPA, summing that high price,
asked for 6 pods where 3 served.

Each scrape interval gives one point: busy slots per batched step (image-steps done / batched steps)
against CPU seconds per batched step. A least-squares line through the recent points gives the fixed and
per-slot terms, and a full pod's CPU per batched step is the line at ``slots``. The line is trusted only
where it is determined: a rising line whose prediction at ``slots`` has a standard error within
``_MAX_RELATIVE_ERROR`` of itself. Points too alike in occupancy (a steady pod; a saturated one, where
the measured figure is already the full pod's) leave the extrapolation to ``slots`` uncertain, and then
the caller keeps its per-image-step price, an upper bound (more pods, never fewer).

Even a trusted line stays between the bounds the points themselves prove, whatever their noise: with
both terms non-negative, a full pod spends at least the CPU per batched step measured at the recent mean
occupancy, and at most that x ``slots`` / the mean occupancy (the per-image-step price).
"""

from __future__ import annotations

import collections
import dataclasses
import math

# Scrape intervals kept: 20 of the chart's 15 s scrapes is 5 minutes, long enough for a pod's occupancy
# to vary (a step, a kill, a new pod's ramp), short enough to follow a change of resolution mix.
DEFAULT_MAX_INTERVALS = 20
# Fewer points than this fit no line worth extrapolating (two are always on one line).
_MIN_INTERVALS = 4
# The line's prediction at full occupancy is used when its standard error is within this share of it.
_MAX_RELATIVE_ERROR = 0.1


@dataclasses.dataclass(frozen=True)
class CpuInterval:
    """What one pod did between two readings."""

    cpu_seconds: float  # the process's CPU seconds spent
    image_steps: int  # sdxl_steps_total's increase
    batched_steps: int  # batched steps run (sdxl_step_duration_seconds' count increase)

    @property
    def busy_slots(self) -> float:
        return self.image_steps / self.batched_steps

    @property
    def cpu_per_batched_step(self) -> float:
        return self.cpu_seconds / self.batched_steps


def full_pod_cpu_per_batched_step(intervals: list[CpuInterval], slots: int) -> float | None:
    """CPU seconds a batched step costs with all ``slots`` busy, from the fitted line, within the bounds
    the intervals prove; None where the line is not determined (see the module's docstring)."""
    points = [i for i in intervals if i.batched_steps > 0 and i.image_steps > 0]
    n = len(points)
    if n < _MIN_INTERVALS or slots <= 0:
        return None
    xs = [p.busy_slots for p in points]
    ys = [p.cpu_per_batched_step for p in points]
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mean_x) ** 2 for x in xs)
    if sxx <= 0:
        return None
    per_slot = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sxx
    if per_slot <= 0:
        return None  # an image-step costs the host something: a falling line is noise
    fixed = mean_y - per_slot * mean_x
    predicted = fixed + per_slot * slots
    if predicted <= 0:
        return None
    residual = sum((y - fixed - per_slot * x) ** 2 for x, y in zip(xs, ys, strict=True))
    error = math.sqrt(residual / (n - 2) * (1 / n + (slots - mean_x) ** 2 / sxx))
    if error > _MAX_RELATIVE_ERROR * predicted:
        return None
    total_batched = sum(p.batched_steps for p in points)
    at_mean = sum(p.cpu_seconds for p in points) / total_batched
    occupancy = sum(p.image_steps for p in points) / total_batched
    return min(max(predicted, at_mean), at_mean * slots / min(occupancy, slots))


class CpuLine:
    """The recent scrape intervals of one pod, and the slot-seconds an image-step costs its CPU when
    every slot is busy: ``full pod's CPU per batched step / CPUs`` (a full batched step holds ``slots``
    slots for ``slots`` image-steps)."""

    def __init__(self, max_intervals: int = DEFAULT_MAX_INTERVALS) -> None:
        if max_intervals < _MIN_INTERVALS:
            raise ValueError(f"max_intervals must be at least {_MIN_INTERVALS}, got {max_intervals}")
        self._intervals: collections.deque[CpuInterval] = collections.deque(maxlen=max_intervals)

    def add(self, interval: CpuInterval) -> None:
        if interval.batched_steps > 0 and interval.image_steps > 0 and interval.cpu_seconds > 0:
            self._intervals.append(interval)

    def price(self, slots: int, cpus: float) -> float | None:
        """Slot-seconds per image-step of a full pod's CPU; None until the line is determined."""
        if cpus <= 0:
            return None
        cpu = full_pod_cpu_per_batched_step(list(self._intervals), slots)
        return None if cpu is None else cpu / cpus
