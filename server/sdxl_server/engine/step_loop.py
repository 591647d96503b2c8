"""The engine thread: one denoising step at a time for every slot, requests joining and leaving between.

Each iteration is one step boundary:

1. retire: slots and queued images whose request was cancelled or ran out of time are freed (a queued
   image whose deadline passed never reaches the device);
2. admit: queued images enter free slots (any free slot with the continuous policy, a whole new batch
   with the static one): the request's prompts are encoded once and `insert` writes the slot's latents,
   embeddings and schedule on the device;
3. dispatch: one `step` program per resolution in use, asynchronously (K steps at once when nobody waits
   to join and every slot has at least K steps left); images whose last step was dispatched are decoded
   (still asynchronously) and handed to the image workers, which wait for the device, encode and deliver;
4. bound the run-ahead: wait until the previous boundary's dispatches completed, so the device always
   has the current boundary's work queued while the host prepares the next, and cancellations take
   effect within one step.

Only this thread touches the slot table and the device slot state.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from sdxl_server.engine.admission import AdmissionQueue, admittable
from sdxl_server.engine.api import (
    CancelledError,
    DeadlineUnreachableError,
    EngineError,
    Failed,
    Finished,
    ImageReady,
    Progress,
    Resolution,
)
from sdxl_server.engine.config import EngineConfig
from sdxl_server.engine.device_clock import DeviceClock
from sdxl_server.engine.encoding import ImageWorkers, encode_image
from sdxl_server.engine.programs import ProgramSet, SlotUpdate
from sdxl_server.engine.schedule import ScheduleBook
from sdxl_server.engine.slots import Occupant, SlotTable
from sdxl_server.engine.stats import StatsBoard
from sdxl_server.engine.trace import Trace, TraceEvent
from sdxl_server.engine.tracking import TrackedRequest, WorkItem

log = logging.getLogger(__name__)

_IDLE_POLL_SECONDS = 0.5  # upper bound on how long an idle loop sleeps without a wake-up


class StepLoop:
    def __init__(
        self,
        *,
        config: EngineConfig,
        programs: ProgramSet,
        schedules: ScheduleBook,
        slots: SlotTable,
        queue: AdmissionQueue,
        device: DeviceClock,
        workers: ImageWorkers,
        trace: Trace,
        stats: StatsBoard,
        clock: Callable[[], float],
        on_fatal: Callable[[BaseException], None],
    ) -> None:
        self._config = config
        self._programs = programs
        self._schedules = schedules
        self._slots = slots
        self._queue = queue
        self._device = device
        self._workers = workers
        self._trace = trace
        self._stats = stats
        self._clock = clock
        self._on_fatal = on_fatal
        self._states = {res: p.empty_state for res, p in programs.by_resolution.items()}
        params = programs.params
        self._text_params = {
            "text_encoder": params["text_encoder"],
            "text_encoder_2": params["text_encoder_2"],
        }
        self._multi_step = max(programs.by_resolution[config.default_resolution].steps)
        self.boundary = 0
        self._stopping = False  # finish accepted work, then exit
        self._aborted = False  # exit at the next boundary
        self._images_lock = threading.Lock()  # image workers count concurrently

    # ---- control, from other threads

    def finish_and_exit(self) -> None:
        self._stopping = True
        self._queue.wake()

    def abort(self) -> None:
        self._aborted = True
        self._queue.wake()

    def run(self) -> None:
        try:
            while not self._aborted and self._iterate():
                pass
        except BaseException as error:  # a failed dispatch means the device or the program is broken
            self._on_fatal(error)

    # ---- one boundary

    def _iterate(self) -> bool:
        now = self._clock()
        self._retire(now)
        self._admit(now)
        # Published before this boundary's events: a caller that saw its Progress never reads stats that
        # still count its images as queued (the service's overload check reads this snapshot).
        self._publish()
        if self._slots.busy == 0:
            if self._stopping and len(self._queue) == 0:
                return False
            self._queue.wait_for_work(_IDLE_POLL_SECONDS)
            return True
        self._dispatch()
        return True

    def _retire(self, now: float) -> None:
        def reason(request: TrackedRequest) -> EngineError | None:
            if request.cancel_requested:
                return CancelledError("cancelled by the caller")
            deadline = request.request.deadline
            if deadline is not None and now >= deadline:
                done, total = sum(request.steps_done), request.total_steps
                return DeadlineUnreachableError(f"deadline passed after {done} of {total} steps")
            return None

        failures: dict[int, tuple[TrackedRequest, EngineError]] = {}
        for occupant in self._slots.occupants():
            request = occupant.item.request
            error = None if request.terminal else reason(request)
            if request.terminal or error is not None:
                self._slots.release(occupant)
                self._note(_retire_kind(error), occupant.item, occupant.slot)
                if error is not None:
                    failures[id(request)] = (request, error)
        for item in self._queue.remove_where(lambda i: i.request.terminal or reason(i.request) is not None):
            error = reason(item.request)
            self._note(_retire_kind(error), item, -1)
            if error is not None:
                failures[id(item.request)] = (item.request, error)
        for request, error in failures.values():
            request.deliver(Failed(error))

    def _admit(self, now: float) -> None:
        count = admittable(self._config.policy, self._slots.free, self._slots.busy)
        for item in self._queue.take(count):
            request = item.request
            occupant = self._slots.assign(item)
            if request.embeddings is None:
                request.embeddings = self._programs.encode(self._text_params, request.token_ids)
            if request.first_step_at is None:
                request.first_step_at = now
            embeds, pooled = request.embeddings
            schedule = self._schedules.get(item.steps)
            update = SlotUpdate(
                slot=np.int32(occupant.slot),
                seed=np.uint32(item.seed % 2**32),  # what PRNGKey(seed) keeps of a 64-bit seed
                prompt_embeds=embeds,
                pooled=pooled,
                zero_negative=np.bool_(request.zero_negative),
                guidance=np.float32(request.request.guidance_scale),
                timesteps=schedule.timesteps,
                sigmas=schedule.sigmas,
                next_sigmas=schedule.next_sigmas,
                num_steps=np.int32(schedule.num_steps),
                init_noise_sigma=np.float32(schedule.init_noise_sigma),
            )
            resolution = occupant.resolution
            self._states[resolution] = self._programs.by_resolution[resolution].insert(
                self._states[resolution], update
            )
            request.images_admitted += 1
            if request.images_admitted == request.request.num_images:
                request.embeddings = None  # every image has its copy in a slot
            self._note("admit", item, occupant.slot, str(resolution))

    def _dispatch(self) -> None:
        occupants = self._slots.occupants()
        k = self._steps_this_dispatch(occupants)
        unet = self._programs.params["unet"]
        in_use = self._slots.resolutions_in_use()
        for resolution in in_use:
            state = self._states[resolution]
            latents, step = self._programs.by_resolution[resolution].steps[k](unet, state)
            self._states[resolution] = state._replace(latents=latents, step=step)
            self._device.track(step, "step", k)
        self.boundary += 1
        self._trace.add(TraceEvent("step", self.boundary, detail=f"k={k} slots={len(occupants)}"))

        finished: dict[Resolution, list[Occupant]] = collections.defaultdict(list)
        progressed: dict[int, TrackedRequest] = {}
        for occupant in occupants:
            advance = min(k, occupant.remaining)
            occupant.steps_dispatched += advance
            request = occupant.item.request
            request.steps_done[occupant.item.index] = occupant.steps_dispatched
            self._stats.counters.steps_total += advance
            progressed[id(request)] = request
            if occupant.remaining == 0:
                self._slots.release(occupant)
                finished[occupant.resolution].append(occupant)
                self._note("finish", occupant.item, occupant.slot)
        for request in progressed.values():
            request.deliver(
                Progress(completed_steps=sum(request.steps_done), total_steps=request.total_steps)
            )
        vae = self._programs.params["vae"]
        for resolution, done in finished.items():
            images = self._programs.by_resolution[resolution].decode(vae, self._states[resolution].latents)
            self._device.track(images, "decode")
            self._workers.submit(self._deliver_images, images, [(o.slot, o.item) for o in done], resolution)
        self._publish()
        self._device.wait_in_flight(at_most=len(in_use) + len(finished))

    def _steps_this_dispatch(self, occupants: list[Occupant]) -> int:
        k = self._multi_step
        if k > 1 and len(self._queue) == 0 and min(o.remaining for o in occupants) >= k:
            return k
        return 1

    # ---- image workers (other threads)

    def _deliver_images(self, images: Any, items: list[tuple[int, WorkItem]], resolution: Resolution) -> None:
        pixels = np.asarray(images)  # waits for the device here, off the step loop
        for slot, item in items:
            request = item.request
            if request.terminal:
                continue
            req = request.request
            data = encode_image(pixels[slot], req.image_format, req.quality)
            request.deliver(
                ImageReady(item.index, item.seed, data, req.image_format, resolution.width, resolution.height)
            )
            with self._images_lock:
                self._stats.counters.images_total += 1
            self._publish()  # before Finished: a caller that reads stats after it sees its images counted
            if request.image_finished():
                now = self._clock()
                first = request.first_step_at if request.first_step_at is not None else now
                request.deliver(
                    Finished(
                        queue_seconds=first - request.submitted_at,
                        denoise_seconds=now - first,
                        total_seconds=now - request.submitted_at,
                    )
                )

    # ---- helpers

    def _note(self, kind: str, item: WorkItem, slot: int, detail: str = "") -> None:
        self._trace.add(TraceEvent(kind, self.boundary, item.request.request_id, item.index, slot, detail))

    def _publish(self) -> None:
        self._stats.publish(
            len(self._queue), self._slots.busy, self._device.step_seconds_ewma, self._device.busy_ratio()
        )


def _retire_kind(error: EngineError | None) -> str:
    if isinstance(error, CancelledError):
        return "cancel"
    if isinstance(error, DeadlineUnreachableError):
        return "expire"
    return "drop"  # the request already ended elsewhere (e.g. an engine failure)
