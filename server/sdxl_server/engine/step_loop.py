"""The engine thread: one denoising step at a time for every busy slot, requests joining and leaving between.

Each iteration is one step boundary. The queue first takes in the images submitted since the last one;
the boundary is then decided on the host as data (batching/boundary_plan.py, which imports no JAX) and
applied here with the compiled programs, in this order:

1. retire: slots and queued images whose request was cancelled or ran out of time are freed (a queued
   image whose deadline passed never reaches the device), and each such request is told why;
2. compact: the latents of images that finished at the last dispatch move into their device's held
   buffer, and each bank's busy slots are packed at the front of their device's block again (one
   `rearrange` program per bank that changed);
3. admit: queued images enter free slots (any free slot with the continuous policy, a whole new batch
   with the static one) at the end of the least-loaded device's block: the request's prompts are encoded
   once and `insert` writes the slot's latents, embeddings and step tables (engine/sampling/) on the device;
4. decode: a bank's held images are decoded, in the smallest compiled batch that holds them, when
   waiting longer cannot fill more devices or fewer images are queued than there are slots
   (decode_hold.py); the pixels go to the image workers (image_workers.py), which copy only the real
   images to the host, encode and deliver them on their own threads;
5. dispatch: per resolution in use, the step program of the smallest row bucket that covers the UNet
   rows of the busiest block (two per guided image, one per unguided one), asynchronously (k steps at
   once, k in 1, 2, 4, ..., K, the most that no slot overshoots, when no waiting image could join
   sooner: none waits, or every slot is taken); then the occupants advance and their requests hear
   their Progress;
6. bound the run-ahead: wait until the previous boundary's dispatches completed, so the device always
   has the current boundary's work queued while the host prepares the next, and cancellations take
   effect within one step.

Ownership: only this thread touches the slot table, the queue's contents, the held buffers and the device
state, and only it publishes the stats view; the image workers run their own code (image_workers.py).
Other threads reach the loop through messages it handles at the next boundary: a submission lands in the
queue's arrivals (moved in by `receive`), a cancellation is a flag on the request read when the boundary
is planned, stop and abort (`finish_and_exit`, `abort`) set flags read at the top of each boundary. Those
two and `statistics()` (a copy of plain numbers only this thread writes) are the only methods other
threads call.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import numpy as np

from sdxl_server.engine.adapters.adapter_loads import AdapterLoads
from sdxl_server.engine.api import (
    CancelledError,
    DeadlineUnreachableError,
    EngineError,
    Failed,
    Progress,
    Resolution,
)
from sdxl_server.engine.batching.admission_queue import AdmissionQueue
from sdxl_server.engine.batching.boundary_plan import (
    Admission,
    BoundaryPlan,
    BoundaryPlanner,
    Compaction,
    Decode,
    Dispatch,
    ProgramSizes,
)
from sdxl_server.engine.batching.slot_table import SlotTable
from sdxl_server.engine.batching.tracked_request import TrackedRequest, WorkItem
from sdxl_server.engine.device.programs import Bank, ProgramSet, Rearrangement, SlotUpdate
from sdxl_server.engine.device_clock import DeviceClock
from sdxl_server.engine.event_trace import EventTrace, TraceEvent, TraceKind
from sdxl_server.engine.image_workers import DecodedBatch, ImageWorkers
from sdxl_server.engine.prompt_cache import PromptCache
from sdxl_server.engine.sampling.book import TableBook
from sdxl_server.engine.settings import EngineConfig
from sdxl_server.engine.stats import LoopStatistics, LoopView, StatsBoard

log = logging.getLogger(__name__)

_IDLE_POLL_SECONDS = 0.5  # upper bound on how long an idle loop sleeps without a wake-up


class StepLoop:
    def __init__(
        self,
        *,
        config: EngineConfig,
        programs: ProgramSet,
        schedules: TableBook,
        slots: SlotTable,
        queue: AdmissionQueue,
        device: DeviceClock,
        workers: ImageWorkers,
        trace: EventTrace,
        stats: StatsBoard,
        clock: Callable[[], float],
        on_fatal: Callable[[BaseException], None],
        adapters: AdapterLoads | None = None,
    ) -> None:
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
        params = programs.params
        self._text_params = {
            "text_encoder": params["text_encoder"],
            "text_encoder_2": params["text_encoder_2"],
        }
        self._prompts = PromptCache(config.prompt_cache_entries, config.prompt_cache_mib * 2**20)
        # Per-request LoRA adapters (--lora-dir): an image waits in the queue, holding no slot, until its
        # adapters are resident in the bank; the images in slots with adapters, by resolution, decide
        # which step program runs (the bank's only while one of them is busy, and the narrowest that
        # covers the most adapters one of them stacks).
        self._adapters = adapters
        # id(WorkItem) -> its bank's resolution and how many adapters it stacks
        self._with_adapters: dict[int, tuple[Resolution, int]] = {}
        if adapters is not None:
            queue.admissible = lambda item: adapters.ready(item.request.adapters)
        # Steps per dispatch compiled (1, 2, 4, ..., K; buckets.py): a dispatch runs the largest that no
        # occupant overshoots.
        self._sizes = ProgramSizes(
            buckets={res: p.buckets for res, p in programs.by_resolution.items()},
            steps_per_dispatch=tuple(
                sorted({k for k, _ in programs.by_resolution[config.default_resolution].steps})
            ),
            row_buckets={res: p.row_buckets for res, p in programs.by_resolution.items()},
        )
        self._planner = BoundaryPlanner(
            policy=config.policy,
            decode_hold_steps=config.decode_hold_steps,
            sizes=self._sizes,
            slots=slots,
            queue=queue,
        )
        self.boundary = 0
        self._host_seconds = 0.0  # time this thread spent working, not waiting on the device or a queue
        self._backpressure_seconds = 0.0  # waits for room in the image workers' bounded queue
        self._tracked_this_boundary = 0
        self._left_queue = 0  # images taken or removed from the queue since the last publish
        self._stopping = False  # finish accepted work, then exit
        self._aborted = False  # exit at the next boundary

    # ---- any thread

    def finish_and_exit(self) -> None:
        self._stopping = True
        self._queue.wake()

    def abort(self) -> None:
        self._aborted = True
        self._queue.wake()

    def statistics(self) -> LoopStatistics:
        return LoopStatistics(
            boundary=self.boundary,
            steps_dispatched=self._planner.steps_dispatched,
            host_seconds=self._host_seconds,
            backpressure_seconds=self._backpressure_seconds,
            programs_compiled=self._programs.programs_compiled,
            buckets=dict(self._sizes.buckets),
            steps_per_dispatch=self._sizes.steps_per_dispatch,
            row_buckets=dict(self._sizes.row_buckets),
        )

    # ---- this thread

    def run(self) -> None:
        try:
            while not self._aborted and self._iterate():
                pass
        except BaseException as error:  # a failed dispatch means the device or the program is broken
            self._on_fatal(error)

    def _iterate(self) -> bool:
        began = time.perf_counter()
        blocked_before = self._backpressure_seconds
        now = self._clock()
        self._tracked_this_boundary = 0
        self._queue.receive()
        if self._adapters is not None:  # loads read since the last boundary go into the bank first
            queued = [(item.request.adapters, item.request) for item in self._queue.items()]
            self._adapters.apply_loads(queued)
        plan = self._planner.plan(now)
        self._retire(plan)
        for compaction in plan.compactions:
            self._compact(compaction)
        for admission in plan.admissions:
            self._admit(admission, now)
        for decode in plan.decodes:
            self._decode(decode)
        self._left_queue += plan.left_queue
        waited = self._backpressure_seconds - blocked_before
        # Published before this boundary's events: a caller that saw its Progress never reads stats that
        # still count its images as queued (the service's overload check reads this snapshot).
        self._publish()
        if plan.dispatch is None:
            self._host_seconds += time.perf_counter() - began - waited
            if self._stopping and len(self._queue) == 0:
                return False
            self._queue.wait_for_work(_IDLE_POLL_SECONDS)
            return True
        waited += self._dispatch(plan.dispatch)
        self._host_seconds += time.perf_counter() - began - waited
        return True

    # ---- applying a plan, in its order

    def _retire(self, plan: BoundaryPlan) -> None:
        for retirement in plan.retirements:
            self._note(_retire_kind(retirement.error), retirement.item, retirement.slot)
            if retirement.slot >= 0:
                self._release_adapters(retirement.item)
        for request, error in plan.failures():
            request.deliver(Failed(error))

    def _compact(self, compaction: Compaction) -> None:
        """Makes room in the held buffer if needed, then stashes the latents of images finished at the
        last dispatch and repacks the bank."""
        resolution = compaction.resolution
        for decode in compaction.room:
            self._decode(decode)
        repacking = compaction.repacking
        if repacking is None:
            return
        plan = Rearrangement(repacking.order, repacking.live, repacking.held_source, repacking.held_take)
        self._banks[resolution] = self._programs.by_resolution[resolution].rearrange(
            self._banks[resolution], plan
        )
        self._trace.add(
            TraceEvent(
                TraceKind.REARRANGE, self.boundary, detail=f"{resolution} held={repacking.held_counts}"
            )
        )

    def _admit(self, admission: Admission, now: float) -> None:
        item = admission.item
        request = item.request
        # First: the places of the slot's adapters, which the text encoders may need too.
        lora_places, lora_scales = self._acquire_adapters(item, admission.resolution)
        if request.embeddings is None:
            request.embeddings = self._embeddings(request, lora_places, lora_scales)
        if request.first_step_at is None:
            request.first_step_at = now
        embeds, pooled = request.embeddings
        asked = request.request
        schedule = self._schedules.get(asked.sampler, asked.timestep_spacing, item.steps, asked.timesteps)
        update = SlotUpdate(
            slot=np.int32(admission.slot),
            seed=np.uint32(item.seed % 2**32),  # what PRNGKey(seed) keeps of a 64-bit seed
            prompt_embeds=embeds,
            pooled=pooled,
            zero_negative=np.bool_(request.zero_negative),
            guidance=np.float32(request.request.guidance_scale),
            guided_from=np.int32(request.guided[0]),
            guided_until=np.int32(request.guided[1]),
            timesteps=schedule.timesteps,
            coefficients=schedule.coefficients,
            num_steps=np.int32(schedule.num_steps),
            init_noise_sigma=np.float32(schedule.init_noise_sigma),
            lora_places=lora_places,
            lora_scales=lora_scales,
        )
        resolution = admission.resolution
        programs = self._programs.by_resolution[resolution]
        bank = self._banks[resolution]
        self._banks[resolution] = bank._replace(slots=programs.insert(bank.slots, update))
        request.images_admitted += 1
        if request.images_admitted == request.request.num_images:
            request.embeddings = None  # every image has its copy in a slot
        self._note(TraceKind.ADMIT, item, admission.slot, str(resolution))

    def _embeddings(self, request: TrackedRequest, lora_places: np.ndarray, lora_scales: np.ndarray) -> Any:
        """The request's prompt embeddings on the device: the prompt cache's, or the text encoders' (an
        `encode` dispatch, traced, its device time going to the request's budget; with the request's
        adapters when one changes a text encoder, from their places in the text encoders' banks)."""
        cached = self._prompts.get(request.prompt_key)
        counters = self._stats.counters
        counters.prompt_cache_hits, counters.prompt_cache_misses = self._prompts.hits, self._prompts.misses
        if cached is not None:
            return cached
        if self._adapters is not None and request.adapters.text_encoders:
            banks = {c: self._adapters.banks[c] for c in ("text_encoder", "text_encoder_2")}
            encode = self._programs.encode_with_adapters
            embeddings = encode(self._text_params, banks, lora_places, lora_scales, request.token_ids)
        else:
            embeddings = self._programs.encode(self._text_params, request.token_ids)
        self._prompts.put(request.prompt_key, embeddings)
        on_measured = functools.partial(request.budget.add, "text_encode_seconds")
        self._device.track(embeddings[1], "encode", on_measured=on_measured)
        self._tracked_this_boundary += 1
        self._trace.add(TraceEvent(TraceKind.ENCODE, self.boundary, request.request_id))
        return embeddings

    def _decode(self, decode: Decode) -> None:
        """Dispatches the decode and hands its images to the image workers (waiting for room in their
        bounded queue counts as backpressure)."""
        resolution, bucket = decode.resolution, decode.bucket
        programs = self._programs.by_resolution[resolution]
        held = self._banks[resolution].held
        pixels = programs.decode[bucket](
            self._programs.params["vae"], held, np.int32(decode.first), decode.counts()
        )
        device_seconds: Future[float] = Future()  # for the time budgets of the requests it holds
        self._device.track(pixels, "decode", on_measured=device_seconds.set_result)
        self._tracked_this_boundary += 1
        self._stats.counters.decodes_total += 1
        sizes = tuple(size for size in self._sizes.buckets[resolution] if size <= bucket)
        self._stats.counters.decode_rows_run += decode.rows_run(sizes)
        images = decode.images()
        self._trace.add(
            TraceEvent(
                TraceKind.DECODE,
                self.boundary,
                detail=f"{resolution} batch={bucket} first={decode.first} images={len(images)}",
            )
        )
        batch = DecodedBatch(pixels, bucket, images, resolution, device_seconds)
        self._backpressure_seconds += self._workers.submit(batch)

    def _dispatch(self, dispatch: Dispatch) -> float:
        """Runs the dispatch, advances the occupants, tells their requests; returns the seconds spent
        waiting for the previous boundary's dispatches."""
        k = dispatch.steps
        unet = self._programs.params["unet"]
        stacks = []  # the adapter programs' stack widths, for the trace
        for resolution, bucket in dispatch.buckets:
            programs = self._programs.by_resolution[resolution]
            bank = self._banks[resolution]
            stacked = max((n for res, n in self._with_adapters.values() if res == resolution), default=0)
            if self._adapters is not None and stacked:
                adapter_bank = self._adapters.banks["unet"]
                width, program = programs.adapter_step(k, bucket, stacked)
                stacks.append(f"{resolution}:{width}")
                latents, history, step = program(unet, adapter_bank, bank.slots)
            else:
                latents, history, step = programs.steps[(k, bucket)](unet, bank.slots)
            slots = bank.slots._replace(latents=latents, history=history, step=step)
            self._banks[resolution] = bank._replace(slots=slots)
            self._device.track(step, "step", k, key=str(resolution))
            self._tracked_this_boundary += 1
            # A device's block with no image skips the UNet (device/denoise.py): its steps ran no rows.
            self._stats.counters.unet_row_steps_run += bucket * sum(
                self._slots.block_active_steps(resolution, k)
            )
        self.boundary += 1
        batches = ",".join(f"{resolution}:{bucket}" for resolution, bucket in dispatch.buckets)
        detail = f"k={k} slots={dispatch.slots_busy} rows={dispatch.rows_busy} batch={batches}"
        if stacks:  # the adapter step ran, applying this many adapters a slot
            detail += f" adapters={','.join(stacks)}"
        self._trace.add(TraceEvent(TraceKind.STEP, self.boundary, detail=detail))

        progressed: dict[int, TrackedRequest] = {}
        denoised: list[TrackedRequest] = []
        for advance in self._planner.record_dispatch(dispatch):
            occupant = advance.occupant
            request = occupant.item.request
            self._stats.counters.steps_total += advance.steps
            done = occupant.steps_dispatched  # after this dispatch
            busy_rows = occupant.item.row_steps(done - advance.steps) - occupant.item.row_steps(done)
            self._stats.counters.unet_row_steps_busy += busy_rows
            progressed[id(request)] = request
            if advance.finished:
                self._release_adapters(occupant.item)
                # Its latents stay in the slot until the next boundary's rearrange moves them to the
                # held buffer; the slot is free for admission from then on.
                self._note(TraceKind.FINISH, occupant.item, occupant.slot)
                denoised.append(request)
        if denoised:  # when the device completes this dispatch, the images it finished are denoised
            self._device.track(step, "denoised", on_measured=functools.partial(self._denoised, denoised))
            self._tracked_this_boundary += 1
        self._publish()  # before the Progress events: a caller never reads stats older than its progress
        for request in progressed.values():
            request.deliver(
                Progress(completed_steps=sum(request.steps_done), total_steps=request.total_steps)
            )
        started_waiting = time.perf_counter()
        self._device.wait_in_flight(at_most=self._tracked_this_boundary)
        return time.perf_counter() - started_waiting

    # ---- helpers

    def _acquire_adapters(self, item: WorkItem, resolution: Resolution) -> tuple[np.ndarray, np.ndarray]:
        """The slot's adapter places and scales (none: place 0 at scale 0, the bank never read)."""
        width = self._programs.by_resolution[resolution].empty_bank.slots.lora_places.shape[1]
        adapters = item.request.adapters
        if self._adapters is None or not adapters:
            return np.zeros(width, np.int32), np.zeros(width, np.float32)
        self._with_adapters[id(item)] = (resolution, len(adapters.files))
        if item.request.images_admitted == 0:
            self._stats.counters.lora_requests += 1
        return self._adapters.acquire(adapters)

    def _release_adapters(self, item: WorkItem) -> None:
        if self._adapters is not None and self._with_adapters.pop(id(item), None) is not None:
            self._adapters.release(item.request.adapters)

    def _denoised(self, requests: list[TrackedRequest], _device_seconds: float) -> None:
        """The device clock's thread: the dispatch that ran these requests' last steps so far completed."""
        now = self._clock()
        for request in requests:
            request.budget.denoised_at = now

    def _note(self, kind: TraceKind, item: WorkItem, slot: int, detail: str = "") -> None:
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
            work_ahead_row_steps=sum(o.item.row_steps(o.steps_dispatched) for o in occupants)
            + sum(item.row_steps() for item in self._queue.items()),
            soonest_free_steps=self._planner.steps_until_a_queued_image_can_enter(),
        )
        if self._adapters is not None:
            self._stats.counters.lora = self._adapters.counts()
        self._stats.publish(view, left_queue=self._left_queue)
        self._left_queue = 0


def _retire_kind(error: EngineError | None) -> TraceKind:
    if isinstance(error, CancelledError):
        return TraceKind.CANCEL
    if isinstance(error, DeadlineUnreachableError):
        return TraceKind.EXPIRE
    return TraceKind.DROP  # the request already ended elsewhere (e.g. an engine failure)
