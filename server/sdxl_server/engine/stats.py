"""Engine statistics: what the step loop publishes at each boundary, plus counters, as snapshots.

Ownership: only the step loop publishes its view (slots busy, work ahead, estimates); image workers
only add to `images_total`; the engine sets the lifecycle flags. The board also keeps the admission
ledger, the number of accepted images not yet in a slot: submitting threads reserve room in it (the
authoritative queue-full check), and the loop releases what left the queue in the same locked call that
publishes the view where those images appear as busy, so a snapshot never counts an image twice or not
at all, and never goes back in time.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Mapping

from sdxl_server.engine.api import EngineStats, Resolution

# Bounds of the retry delay suggested when the queue is full (seconds).
MIN_RETRY_SECONDS = 0.1
MAX_RETRY_SECONDS = 60.0


@dataclasses.dataclass(frozen=True)
class LoraCounts:
    """The adapter bank's totals (engine/adapters/adapter_loads.py), written by the step loop."""

    loads: int = 0  # adapters written into the bank
    evictions: int = 0
    load_seconds: float = 0.0  # first use to place written, summed over the loads
    resident: int = 0
    failures: int = 0  # loads that failed (the file changed or vanished after it was checked)


@dataclasses.dataclass
class Counters:
    steps_total: int = 0  # batched step dispatches x steps each, counted per image slot that advanced
    images_total: int = 0
    compile_seconds: float = 0.0
    startup_seconds: float = 0.0
    ready: bool = False
    healthy: bool = True
    prompt_cache_hits: int = 0  # written by the step loop only
    prompt_cache_misses: int = 0
    lora: LoraCounts = dataclasses.field(default_factory=LoraCounts)  # written by the step loop only
    lora_requests: int = 0  # requests with adapters that reached a slot
    # How full the batches ran (the step loop only): the UNet row-steps the step programs ran, padding
    # included (the row bucket x each device's steps with an image in its block: an empty block skips
    # the UNet), and those of busy slots; the decode calls and the VAE
    # rows they ran (each device's decode batch, padding included).
    unet_row_steps_run: int = 0
    unet_row_steps_busy: int = 0
    decodes_total: int = 0
    decode_rows_run: int = 0


@dataclasses.dataclass(frozen=True)
class LoopView:
    """What the step loop saw at a boundary."""

    slots_busy: int = 0
    step_seconds: float = 0.0  # recent device seconds of one step (all resolutions)
    step_seconds_by_resolution: tuple[tuple[str, float], ...] = ()
    decode_seconds: float = 0.0
    busy_ratio: float = 0.0
    work_ahead_row_steps: int = 0  # UNet row-steps still to run for the images in slots and in the queue
    soonest_free_steps: int = 0  # steps until the first slot frees (0 when one is free)


@dataclasses.dataclass(frozen=True)
class LoopStatistics:
    """The step loop's running totals and what was compiled, read by benchmarks and tests
    (`JaxEngine.loop_statistics()`); the service reads `EngineStats` instead."""

    boundary: int = 0  # step dispatches so far: the boundary number trace events carry
    steps_dispatched: int = 0  # denoising steps dispatched (k per dispatch)
    host_seconds: float = 0.0  # the loop's own work, not waiting on the device or a queue
    # Waits for room in the image workers' bounded queue: host work (copies to the host, encoding)
    # delaying the next dispatch. It should stay near zero.
    backpressure_seconds: float = 0.0
    programs_compiled: int = 0  # programs built at start (compiled, or loaded from the cache)
    buckets: Mapping[Resolution, tuple[int, ...]] = dataclasses.field(default_factory=dict)  # decodes
    steps_per_dispatch: tuple[int, ...] = ()  # 1, 2, 4, ..., K: the step programs' step counts
    # The step programs' UNet rows per device (1, 2, 4, ..., 2 x slots per device), per resolution.
    row_buckets: Mapping[Resolution, tuple[int, ...]] = dataclasses.field(default_factory=dict)


class StatsBoard:
    def __init__(self, slots_total: int) -> None:
        self.counters = Counters()
        self._slots_total = slots_total
        self._lock = threading.Lock()
        self._view = LoopView()
        self._waiting = 0  # the admission ledger: accepted images not yet in a slot (nor dropped)

    def set_slots_total(self, slots_total: int) -> None:
        self._slots_total = slots_total

    # ---- the admission ledger (any thread)

    def reserve(self, images: int, max_images: int) -> int | None:
        """Takes room for `images` in the queue; returns how many wait ahead, or None when it is full."""
        with self._lock:
            if self._waiting + images > max_images:
                return None
            ahead = self._waiting
            self._waiting += images
            return ahead

    def waiting(self) -> int:
        return self._waiting

    # ---- writers

    def publish(self, view: LoopView, left_queue: int = 0) -> None:
        """The step loop's view; `left_queue` images left the queue since its last publish."""
        with self._lock:
            self._view = view
            self._waiting -= left_queue

    def count_image(self) -> None:
        with self._lock:
            self.counters.images_total += 1

    # ---- readers

    def snapshot(self) -> EngineStats:
        with self._lock:
            view, waiting, c, total = self._view, self._waiting, self.counters, self._slots_total
            return EngineStats(
                queue_depth=waiting,
                slots_busy=view.slots_busy,
                slots_total=total,
                load=(waiting + view.slots_busy) / total if total else 0.0,
                steps_total=c.steps_total,
                images_total=c.images_total,
                step_seconds_ewma=view.step_seconds,
                device_busy_ratio=view.busy_ratio,
                compile_seconds=c.compile_seconds,
                startup_seconds=c.startup_seconds,
                ready=c.ready,
                healthy=c.healthy,
                decode_seconds_ewma=view.decode_seconds,
                work_ahead_row_steps=view.work_ahead_row_steps,
                retry_after_seconds=retry_after(view),
                step_seconds_by_resolution=dict(view.step_seconds_by_resolution),
                prompt_cache_hits=c.prompt_cache_hits,
                prompt_cache_misses=c.prompt_cache_misses,
                lora_loads=c.lora.loads,
                lora_evictions=c.lora.evictions,
                lora_load_seconds=c.lora.load_seconds,
                lora_resident=c.lora.resident,
                lora_load_failures=c.lora.failures,
                lora_requests=c.lora_requests,
                unet_row_steps_run=c.unet_row_steps_run,
                unet_row_steps_busy=c.unet_row_steps_busy,
                decodes_total=c.decodes_total,
                decode_rows_run=c.decode_rows_run,
            )


def retry_after(view: LoopView) -> float:
    """When a queue place opens: the first queued image enters a slot when the occupant closest to done
    finishes (a retry sooner would be refused again; the whole queue's work would overstate it). Bounded."""
    if view.step_seconds <= 0:
        return 1.0
    seconds = view.step_seconds * view.soonest_free_steps
    return float(min(max(seconds, MIN_RETRY_SECONDS), MAX_RETRY_SECONDS))
