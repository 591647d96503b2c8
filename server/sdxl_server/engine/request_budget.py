"""Where one request's time went inside the engine, filled in by the threads that spend it.

The caller's thread adds tokenizing; the device clock's watcher adds the text encoders' and the VAE
decode's device time (measured from the host without stalling the step loop, device_clock.py); the image
workers add the copy to the host and the image encoding, per image, concurrently (hence the lock); the
step loop marks when the last image was denoised. `Finished` carries the totals (api.py), and the
service adds its own phases around them (service/generation.py).

Before a request starts, `estimate_seconds` is its expected time (what a deadline is checked against),
counted in UNet rows, the unit of capacity: a device runs at most two rows a slot per step, a guided
image takes two and an unguided one one (batching/guidance_rows.py). Counted in images, a queue of
unguided work read as twice the wait it is.
"""

from __future__ import annotations

import dataclasses
import math
import threading

from sdxl_server.engine.api import EngineStats, Resolution
from sdxl_server.engine.batching.buckets import rows_per_device


def own_seconds(
    stats: EngineStats, num_images: int, steps: int, rows_per_image: int, resolution: Resolution | None = None
) -> float | None:
    """A request's own denoising on an idle server: its steps at the measured step time of its
    resolution, once per round of images that the rows hold (`rows_per_image`: its images' most rows
    at one step, guidance_rows.peak_rows). None before a step was measured."""
    step = _step_seconds(stats, resolution)
    if step is None:
        return None
    return step * steps * math.ceil(num_images * rows_per_image / _rows_total(stats))


def estimate_seconds(
    stats: EngineStats, num_images: int, steps: int, rows_per_image: int, resolution: Resolution | None = None
) -> float | None:
    """Seconds a request would take from now, from the step loop's last published view: the rows of
    the work ahead of it (in slots and queued) spread over the rows a step runs, unless free rows take
    it now; then its own steps (`own_seconds`) and a decode. None before anything was measured."""
    step = _step_seconds(stats, resolution)
    own = own_seconds(stats, num_images, steps, rows_per_image, resolution)
    if step is None or own is None:
        return None
    # slots_busy is the rows taken, halved and rounded up (stats.py): the free rows are at least these.
    free_rows = rows_per_device(stats.slots_total - stats.slots_busy)
    idle_room = stats.queue_depth == 0 and free_rows >= num_images * rows_per_image
    wait = 0.0 if idle_room else step * stats.work_ahead_row_steps / _rows_total(stats)
    return wait + own + stats.decode_seconds_ewma


def _rows_total(stats: EngineStats) -> int:
    return rows_per_device(stats.slots_total)  # two rows a slot, summed over the devices


def _step_seconds(stats: EngineStats, resolution: Resolution | None) -> float | None:
    step = stats.step_seconds_ewma
    if resolution is not None:
        step = stats.step_seconds_by_resolution.get(str(resolution), step)
    return step if step > 0 and stats.slots_total > 0 else None


@dataclasses.dataclass
class RequestBudget:
    tokenize_seconds: float = 0.0
    text_encode_seconds: float = 0.0  # 0 when the prompt-embedding cache held the prompts
    decode_seconds: float = 0.0  # device time of the decode batches that held its images
    to_host_seconds: float = 0.0
    image_encode_seconds: float = 0.0
    denoised_at: float | None = None  # engine clock: when its last image ran its last step
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, phase: str, seconds: float) -> None:
        with self._lock:
            setattr(self, phase, getattr(self, phase) + seconds)
