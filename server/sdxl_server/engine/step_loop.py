"""The engine thread: one denoising step at a time for every busy slot, requests joining and leaving between.

Each iteration is one step boundary:

1. retire: slots and queued images whose request was cancelled or ran out of time are freed (a queued
   image whose deadline passed never reaches the device);
2. compact: the latents of images that finished at the last dispatch move into their device's held
   buffer, and each bank's busy slots are packed at the front of their device's block again (one
   `rearrange` program per bank that changed);
3. admit: queued images enter free slots (any free slot with the continuous policy, a whole new batch
   with the static one) at the end of the least-loaded device's block: the request's prompts are encoded
   once and `insert` writes the slot's latents, embeddings and schedule on the device;
4. decode: a bank's held images are decoded, in the smallest compiled batch that holds them, when
   waiting longer cannot fill more devices or fewer images are queued than there are slots
   (decode_hold.py); the pixels go to the image workers, which copy only the real images to the host,
   encode and deliver them;
5. dispatch: per resolution in use, the step program of the smallest bucket that covers the busiest
   block, asynchronously (k steps at once, k in 1, 2, 4, ..., K, the most that no slot overshoots, when
   no waiting image could join sooner: none waits, or every slot is taken);
6. bound the run-ahead: wait until the previous boundary's dispatches completed, so the device always
   has the current boundary's work queued while the host prepares the next, and cancellations take
   effect within one step.

Ownership: only this thread touches the slot table, the queue's contents, the held buffers and the device
state, and only it publishes the stats view. Other threads reach it through messages it handles at the
next boundary: a submission lands in the queue's arrivals (moved in by `receive`), a cancellation is a
flag on the request read by `retire`, stop and abort are flags read at the top of each boundary.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from sdxl_server.engine.batching.admission_queue import AdmissionQueue, admittable
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
from sdxl_server.engine.batching.buckets import covering_bucket, largest_fitting
from sdxl_server.engine.settings import EngineConfig
from sdxl_server.engine.batching.decode_hold import HeldImages, decode_now
from sdxl_server.engine.device_clock import DeviceClock
from sdxl_server.engine.image_workers import ImageWorkers, encode_image
from sdxl_server.engine.device.programs import Bank, ProgramSet, Rearrangement, SlotUpdate
from sdxl_server.engine.device.noise_schedule import ScheduleBook
from sdxl_server.engine.batching.slot_table import Occupant, SlotTable
from sdxl_server.engine.stats import LoopView, StatsBoard
from sdxl_server.engine.event_trace import Trace, TraceEvent
from sdxl_server.engine.batching.tracked_request import TrackedRequest, WorkItem

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
        self._banks: dict[Resolution, Bank] = {res: p.empty_bank for res, p in programs.by_resolution.items()}
        self._held = {res: HeldImages(slots.devices, slots.per_device) for res in programs.by_resolution}
        self._finishing: dict[Resolution, list[Occupant]] = collections.defaultdict(list)
        params = programs.params
        self._text_params = {
            "text_encoder": params["text_encoder"],
            "text_encoder_2": params["text_encoder_2"],
        }
        # Steps per dispatch compiled (1, 2, 4, ..., K; buckets.py): a dispatch runs the largest that no
        # occupant overshoots.
        self._dispatch_sizes = tuple(
            sorted({k for k, _ in programs.by_resolution[config.default_resolution].steps})
        )
        self._multi_step = self._dispatch_sizes[-1]
        self.boundary = 0
        self.steps_dispatched = 0  # denoising steps dispatched so far (K per multi-step dispatch)
        self.host_seconds = 0.0  # time this thread spent working, not waiting on the device or a queue
        # Time this thread waited for room in the image workers' bounded queue: host work (copies to the
        # host, encoding) delaying the next dispatch. Benchmarks read it; it should stay near zero.
        self.backpressure_seconds = 0.0
        self._tracked_this_boundary = 0
        self._left_queue = 0  # images taken or removed from the queue since the last publish
        self._stopping = False  # finish accepted work, then exit
        self._aborted = False  # exit at the next boundary

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
        began = time.perf_counter()
        blocked_before = self.backpressure_seconds
        now = self._clock()
        self._tracked_this_boundary = 0
        self._queue.receive()
        self._retire(now)
        self._compact()
        self._admit(now)
        self._decode_due()
        waited = self.backpressure_seconds - blocked_before
        # Published before this boundary's events: a caller that saw its Progress never reads stats that
        # still count its images as queued (the service's overload check reads this snapshot).
        self._publish()
        if self._slots.busy == 0:
            self.host_seconds += time.perf_counter() - began - waited
            if self._stopping and len(self._queue) == 0:
                return False
            self._queue.wait_for_work(_IDLE_POLL_SECONDS)
            return True
        waited += self._dispatch()
        self.host_seconds += time.perf_counter() - began - waited
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
        queued_errors: dict[int, EngineError | None] = {}

        def doomed(item: WorkItem) -> bool:
            error = None if item.request.terminal else reason(item.request)
            queued_errors[id(item)] = error
            return item.request.terminal or error is not None

        removed = self._queue.remove_where(doomed)
        self._left_queue += len(removed)
        for item in removed:
            error = queued_errors[id(item)]
            self._note(_retire_kind(error), item, -1)
            if error is not None:
                failures[id(item.request)] = (item.request, error)
        for request, error in failures.values():
            request.deliver(Failed(error))

    def _compact(self) -> None:
        """Stashes the latents of images finished at the last dispatch and repacks every bank with holes."""
        total = self._slots.total
        per = self._slots.per_device
        for resolution, programs in self._programs.by_resolution.items():
            finishing = self._finishing.pop(resolution, [])
            held = self._held[resolution]
            arriving = [0] * self._slots.devices
            for occupant in finishing:
                arriving[occupant.device] += 1
            if any(h + a > held.capacity for h, a in zip(held.counts(), arriving, strict=True)):
                self._decode(resolution)  # make room: never drop a finished image
            held_source = np.zeros(total, np.int32)
            held_take = np.zeros(total, bool)
            for occupant in finishing:
                row = held.add(occupant.device, occupant.item, self.steps_dispatched)
                held_source[occupant.device * per + row] = occupant.slot - occupant.device * per
                held_take[occupant.device * per + row] = True
            repack = self._slots.repack(resolution)
            if repack is None:  # nothing was released, so nothing finished either
                continue
            plan = Rearrangement(repack.order, repack.live, held_source, held_take)
            self._banks[resolution] = programs.rearrange(self._banks[resolution], plan)
            self._trace.add(
                TraceEvent("rearrange", self.boundary, detail=f"{resolution} held={held.counts()}")
            )

    def _admit(self, now: float) -> None:
        count = admittable(self._config.policy, self._slots.free, self._slots.busy)
        taken = self._queue.take(count)
        self._left_queue += len(taken)
        for item in taken:
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
            programs = self._programs.by_resolution[resolution]
            bank = self._banks[resolution]
            self._banks[resolution] = bank._replace(slots=programs.insert(bank.slots, update))
            request.images_admitted += 1
            if request.images_admitted == request.request.num_images:
                request.embeddings = None  # every image has its copy in a slot
            self._note("admit", item, occupant.slot, str(resolution))

    def _decode_due(self) -> None:
        """Decodes the banks whose held images should not wait."""
        for resolution, held in self._held.items():
            if not held:
                continue
            soonest: list[int | None] = [None] * self._slots.devices
            arriving = [0] * self._slots.devices
            for occupant in self._slots.occupants():
                if occupant.resolution != resolution:
                    continue
                d = occupant.device
                current = soonest[d]
                soonest[d] = occupant.remaining if current is None else min(current, occupant.remaining)
                arriving[d] += occupant.remaining <= self._multi_step
            oldest = held.oldest_step()
            waited_steps = self.steps_dispatched - (oldest if oldest is not None else self.steps_dispatched)
            if decode_now(
                held.counts(),
                waited_steps,
                self._config.decode_hold_steps,
                soonest,
                arriving,
                held.capacity,
                backlog_deep=len(self._queue) >= self._slots.total,
            ):
                self._decode(resolution)

    def _decode(self, resolution: Resolution) -> None:
        """Dispatches the decode of every image held for `resolution` and hands it to the image workers
        (waiting for room in their bounded queue counts as backpressure)."""
        held = self._held[resolution]
        counts = held.counts()
        rows = held.take_all()
        programs = self._programs.by_resolution[resolution]
        bucket = covering_bucket(programs.buckets, max(counts))
        images = programs.decode[bucket](self._programs.params["vae"], self._banks[resolution].held)
        self._device.track(images, "decode")
        self._tracked_this_boundary += 1
        jobs = [(device, image.row, image.item) for device, block in enumerate(rows) for image in block]
        self._trace.add(
            TraceEvent("decode", self.boundary, detail=f"{resolution} batch={bucket} images={len(jobs)}")
        )
        self.backpressure_seconds += self._workers.submit(
            self._deliver_images, images, bucket, jobs, resolution
        )

    def _dispatch(self) -> float:
        occupants = self._slots.occupants()
        k = self._steps_this_dispatch(occupants)
        unet = self._programs.params["unet"]
        in_use = self._slots.resolutions_in_use()
        batches = []
        for resolution in in_use:
            programs = self._programs.by_resolution[resolution]
            bucket = covering_bucket(programs.buckets, max(self._slots.block_sizes(resolution)))
            bank = self._banks[resolution]
            latents, step = programs.steps[(k, bucket)](unet, bank.slots)
            self._banks[resolution] = bank._replace(slots=bank.slots._replace(latents=latents, step=step))
            self._device.track(step, "step", k, key=str(resolution))
            self._tracked_this_boundary += 1
            batches.append(f"{resolution}:{bucket}")
        self.boundary += 1
        self.steps_dispatched += k
        detail = f"k={k} slots={len(occupants)} batch={','.join(batches)}"
        self._trace.add(TraceEvent("step", self.boundary, detail=detail))

        progressed: dict[int, TrackedRequest] = {}
        for occupant in occupants:
            advance = min(k, occupant.remaining)
            occupant.steps_dispatched += advance
            request = occupant.item.request
            request.steps_done[occupant.item.index] = occupant.steps_dispatched
            self._stats.counters.steps_total += advance
            progressed[id(request)] = request
            if occupant.remaining == 0:
                # Its latents stay in the slot until the next boundary's rearrange moves them to the
                # held buffer; the slot is free for admission from then on.
                self._slots.release(occupant)
                self._finishing[occupant.resolution].append(occupant)
                self._note("finish", occupant.item, occupant.slot)
        self._publish()  # before the Progress events: a caller never reads stats older than its progress
        for request in progressed.values():
            request.deliver(
                Progress(completed_steps=sum(request.steps_done), total_steps=request.total_steps)
            )
        started_waiting = time.perf_counter()
        self._device.wait_in_flight(at_most=self._tracked_this_boundary)
        return time.perf_counter() - started_waiting

    def _steps_this_dispatch(self, occupants: list[Occupant]) -> int:
        """The most compiled steps per dispatch (up to K) that no occupant overshoots, when no waiting
        image could have joined before they end; else 1.

        Admission ran just before, so an image still waiting has no slot it may take (every slot is
        taken, or the static policy waits for the whole batch); while every occupant has k steps left no
        slot frees (short of a cancellation) and the waiting image loses nothing. Under saturation this
        is most boundaries, where the per-dispatch cost matters most.
        """
        slots = self._slots
        nobody_could_join = (
            len(self._queue) == 0 or admittable(self._config.policy, slots.free, slots.busy) == 0
        )
        if not nobody_could_join:
            return 1
        return largest_fitting(self._dispatch_sizes, min(o.remaining for o in occupants))

    # ---- image workers (other threads)

    def _deliver_images(
        self, images: Any, bucket: int, jobs: list[tuple[int, int, WorkItem]], resolution: Resolution
    ) -> None:
        # Only the rows that hold real images cross to the host (each device's block holds `bucket`).
        by_block = {(shard.index[0].start or 0) // bucket: shard.data for shard in images.addressable_shards}
        needed: dict[int, int] = {}
        for device, row, _ in jobs:
            needed[device] = max(needed.get(device, 0), row + 1)
        pixels = {  # waits for the device here, off the step loop
            device: np.asarray(by_block[device] if rows == bucket else by_block[device][:rows])
            for device, rows in needed.items()
        }
        for device, row, item in jobs:
            request = item.request
            if request.terminal:
                continue
            req = request.request
            data = encode_image(pixels[device][row], req.image_format, req.quality)
            request.deliver(
                ImageReady(item.index, item.seed, data, req.image_format, resolution.width, resolution.height)
            )
            self._stats.count_image()  # before Finished: a caller that reads stats then sees its images
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
        occupants = self._slots.occupants()
        device = self._device
        view = LoopView(
            slots_busy=self._slots.busy,
            step_seconds=device.step_seconds_ewma,
            step_seconds_by_resolution=tuple(sorted(device.step_seconds_by_key.items())),
            decode_seconds=device.decode_seconds_ewma,
            busy_ratio=device.busy_ratio(),
            work_ahead_steps=sum(o.remaining for o in occupants) + sum(i.steps for i in self._queue.items()),
            soonest_free_steps=self._steps_until_a_queued_image_can_enter(occupants),
        )
        self._stats.publish(view, left_queue=self._left_queue)
        self._left_queue = 0

    def _steps_until_a_queued_image_can_enter(self, occupants: list[Occupant]) -> int:
        if not occupants:
            return 0
        if self._config.policy == "static":  # the next batch starts when the whole batch is done
            return max(o.remaining for o in occupants)
        return 0 if self._slots.free > 0 else min(o.remaining for o in occupants)


def _retire_kind(error: EngineError | None) -> str:
    if isinstance(error, CancelledError):
        return "cancel"
    if isinstance(error, DeadlineUnreachableError):
        return "expire"
    return "drop"  # the request already ended elsewhere (e.g. an engine failure)
