"""What the step loop does at a step boundary, decided on the host before any program runs.

`BoundaryPlanner.plan` decides one boundary and returns it as data, a `BoundaryPlan`; the step loop
(step_loop.py) then applies it with the compiled programs, in the plan's order:

1. retirements: the slots and queued images of requests that were cancelled, ran out of time, or
   already ended elsewhere;
2. compactions, per bank: a decode that makes room when the images finished at the last dispatch would
   overflow their device's held buffer, then one rearrangement that moves those images' latents into the
   held buffer and packs each block's busy slots at its front again;
3. admissions: which queued images enter which slot (at every boundary with the continuous policy, a
   whole new batch with the static one), in queue order while their rows fit: an image enters a device
   only if the device's rows stay within its capacity (2P) at every future step (slot_table.py), and
   the first image that does not fit (the head of the line) is not passed by one behind it that would
   delay the step at which it can enter, so that smaller images cannot starve it; one that cannot delay
   it takes rows that would otherwise run empty (backfilling, continuous policy only; admission_queue.py,
   slot_table.py), each at the end of its bank's block on the device with the least work left;
4. decodes: which banks' held images are decoded now, in which compiled batch, in as many calls of at
   most the largest decode batch as they need (decode_hold.py);
5. the dispatch: the steps per dispatch k and, per bank in use, the compiled row batch that covers the
   UNet rows of its busiest block at any of those k steps (None when no slot is busy). An image takes
   two rows at a guided step and one at an unguided step (guidance_rows.py), so a slot's rows can
   change between boundaries, or within a dispatch, when its guidance interval ends or begins.

Deciding updates the host's mirrors as if the plan were already applied, since they describe the device
state the plan leads to: the slot table (occupants, holes), each bank's held images, the queue's
contents. It touches nothing else: no device, no listener, no clock, no trace. After the dispatch has
been applied, `record_dispatch` advances the occupants and frees the slots of those that finished.

This module imports no JAX (a test holds it), so the batching policy is tested with plain requests:
tests/unit/engine/batching/test_boundary_plan.py. Only the step loop's thread uses a planner.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Mapping

import numpy as np

from sdxl_server.engine.api import CancelledError, DeadlineUnreachableError, EngineError, Resolution
from sdxl_server.engine.batching.admission_queue import AdmissionQueue, admits_now
from sdxl_server.engine.batching.buckets import covering_bucket, largest_fitting
from sdxl_server.engine.batching.decode_hold import HeldImage, HeldImages, decode_now
from sdxl_server.engine.batching.slot_table import Occupant, SlotTable
from sdxl_server.engine.batching.tracked_request import TrackedRequest, WorkItem


@dataclasses.dataclass(frozen=True)
class ProgramSizes:
    """What was compiled, as far as the policy cares: the programs' shapes, not the programs."""

    # Per-device decode batch sizes (images) of each bank: 1, 2, 4, ... up to the decode batch.
    buckets: Mapping[Resolution, tuple[int, ...]]
    steps_per_dispatch: tuple[int, ...]  # 1, 2, 4, ..., K (ascending)
    # Per-device UNet row counts the step programs of each bank are compiled for (1, 2, 4, ..., 2P).
    row_buckets: Mapping[Resolution, tuple[int, ...]]

    def rows_of(self, resolution: Resolution) -> tuple[int, ...]:
        return self.row_buckets[resolution]


@dataclasses.dataclass(frozen=True)
class Retirement:
    item: WorkItem
    slot: int  # the slot it left, or -1 when it was still queued
    error: EngineError | None  # what its request is told; None: the request already ended elsewhere


@dataclasses.dataclass(frozen=True)
class Decode:
    """One decode call: held rows first .. first+bucket-1 of every device's block, in the smallest
    compiled batch per device that holds the images it delivers."""

    resolution: Resolution
    bucket: int
    held: list[list[HeldImage]]  # per device, the images this call delivers (row i of device d's block)
    first: int = 0  # the first held row it decodes, on every device

    def counts(self) -> np.ndarray:
        """int32[devices]: the rows each device decodes, from `first` through its last delivered image (0
        where it delivers none: that device skips the VAE; programs.py's `decode`)."""
        return np.array(
            [max((image.row - self.first + 1 for image in rows), default=0) for rows in self.held], np.int32
        )

    def rows_run(self, sizes: tuple[int, ...]) -> int:
        """VAE rows this call runs on all devices: on each, the smallest of `sizes` (the decode batches
        up to `bucket`, ascending) that holds its count, none for 0, as programs.py's `decode` picks."""
        return sum(next(size for size in sizes if size >= count) for count in self.counts() if count > 0)

    def images(self) -> list[tuple[int, int, WorkItem]]:
        """(device, row in the call's output block, image) for every decoded image, device by device."""
        return [
            (device, image.row - self.first, image.item)
            for device, rows in enumerate(self.held)
            for image in rows
        ]


@dataclasses.dataclass(frozen=True, eq=False)
class Repacking:
    """Host-built indices for the `rearrange` program, local to each device block (see programs.py)."""

    order: np.ndarray  # int32[slots]: new position i of block d takes the slot at d*P + order[d*P + i]
    live: np.ndarray  # bool[slots]: positions that hold a busy slot after packing
    held_source: np.ndarray  # int32[slots]: held row r of block d takes the latents of slot d*P + source
    held_take: np.ndarray  # bool[slots]: held rows written
    held_counts: list[int]  # images each device holds afterwards


@dataclasses.dataclass(frozen=True)
class Compaction:
    resolution: Resolution
    room: tuple[Decode, ...]  # applied first: the held buffer is emptied for the arriving images
    repacking: Repacking | None


@dataclasses.dataclass(frozen=True)
class Admission:
    item: WorkItem
    resolution: Resolution
    device: int
    slot: int


@dataclasses.dataclass(frozen=True)
class Dispatch:
    steps: int  # denoising steps per slot in this dispatch (k)
    buckets: tuple[tuple[Resolution, int], ...]  # per bank in use: the compiled UNet rows per device
    slots_busy: int
    rows_busy: int = 0  # UNet rows of every busy slot at the dispatch's first step, all banks


@dataclasses.dataclass(frozen=True)
class BoundaryPlan:
    retirements: tuple[Retirement, ...] = ()
    compactions: tuple[Compaction, ...] = ()
    admissions: tuple[Admission, ...] = ()
    decodes: tuple[Decode, ...] = ()
    dispatch: Dispatch | None = None

    def failures(self) -> list[tuple[TrackedRequest, EngineError]]:
        """Each retired request with an error, once, in the order it was first retired."""
        failed: dict[int, tuple[TrackedRequest, EngineError]] = {}
        for retirement in self.retirements:
            if retirement.error is not None:
                failed[id(retirement.item.request)] = (retirement.item.request, retirement.error)
        return list(failed.values())

    @property
    def left_queue(self) -> int:
        """Images this boundary takes out of the queue (retired while queued, or admitted)."""
        return sum(r.slot < 0 for r in self.retirements) + len(self.admissions)


@dataclasses.dataclass(frozen=True)
class Advance:
    occupant: Occupant
    steps: int  # steps it ran in the dispatch (k, or fewer at its end)
    finished: bool  # its slot is free; its latents move to the held buffer at the next boundary


class BoundaryPlanner:
    def __init__(
        self,
        *,
        policy: str,
        decode_hold_steps: int,
        sizes: ProgramSizes,
        slots: SlotTable,
        queue: AdmissionQueue,
    ) -> None:
        self._policy = policy
        self._hold_steps = decode_hold_steps
        self._sizes = sizes
        self._slots = slots
        self._queue = queue
        self._held = {res: HeldImages(slots.devices, slots.per_device) for res in sizes.buckets}
        # Occupants that finished at the last dispatch: their latents are still in their slots.
        self._finishing: dict[Resolution, list[Occupant]] = collections.defaultdict(list)
        self._multi_step = sizes.steps_per_dispatch[-1]
        self.steps_dispatched = 0  # denoising steps dispatched so far (k per dispatch)

    def plan(self, now: float) -> BoundaryPlan:
        """Decides the boundary at time `now` (the queue has received its arrivals)."""
        retirements = self._retire(now)
        compactions = self._compact()
        admissions = self._admit()
        decodes = self._decodes_due()
        dispatch = self._dispatch() if self._slots.busy else None
        return BoundaryPlan(retirements, compactions, admissions, decodes, dispatch)

    def record_dispatch(self, dispatch: Dispatch) -> list[Advance]:
        """Advances every occupant (and its request's step count) by the dispatch's steps, none past its
        end, and frees the slots of those that finished; in slot table order."""
        self.steps_dispatched += dispatch.steps
        advances = []
        for occupant in self._slots.occupants():
            steps = min(dispatch.steps, occupant.remaining)
            occupant.steps_dispatched += steps
            occupant.item.request.steps_done[occupant.item.index] = occupant.steps_dispatched
            finished = occupant.remaining == 0
            if finished:
                self._slots.release(occupant)
                self._finishing[occupant.resolution].append(occupant)
            advances.append(Advance(occupant, steps, finished))
        return advances

    def steps_until_a_queued_image_can_enter(self) -> int:
        """Steps until the queue's first image fits (a guided image when none waits), if nothing else
        entered: rows free when an occupant ends or its guidance interval does."""
        occupants = self._slots.occupants()
        if not occupants:
            return 0
        if self._policy == "static":  # the next batch starts when the whole batch is done
            return max(o.remaining for o in occupants)
        queued = self._queue.items()
        return self._slots.steps_until_room(queued[0] if queued else None)

    # ---- the five decisions, in the order they are applied

    def _retire(self, now: float) -> tuple[Retirement, ...]:
        def reason(request: TrackedRequest) -> EngineError | None:
            if request.cancel_requested:
                return CancelledError("cancelled by the caller")
            deadline = request.request.deadline
            if deadline is not None and now >= deadline:
                done, total = sum(request.steps_done), request.total_steps
                return DeadlineUnreachableError(f"deadline passed after {done} of {total} steps")
            return None

        retirements = []
        for occupant in self._slots.occupants():
            request = occupant.item.request
            error = None if request.terminal else reason(request)
            if request.terminal or error is not None:
                self._slots.release(occupant)
                retirements.append(Retirement(occupant.item, occupant.slot, error))
        queued_errors: dict[int, EngineError | None] = {}

        def doomed(item: WorkItem) -> bool:
            error = None if item.request.terminal else reason(item.request)
            queued_errors[id(item)] = error
            return item.request.terminal or error is not None

        for item in self._queue.remove_where(doomed):
            retirements.append(Retirement(item, -1, queued_errors[id(item)]))
        return tuple(retirements)

    def _compact(self) -> tuple[Compaction, ...]:
        slots = self._slots
        per = slots.per_device
        compactions = []
        for resolution, held in self._held.items():
            finishing = self._finishing.pop(resolution, [])
            arriving = [0] * slots.devices
            for occupant in finishing:
                arriving[occupant.device] += 1
            room: tuple[Decode, ...] = ()
            if any(h + a > held.capacity for h, a in zip(held.counts(), arriving, strict=True)):
                room = self._take_decodes(resolution)  # never drop a finished image
            held_source = np.zeros(slots.total, np.int32)
            held_take = np.zeros(slots.total, bool)
            for occupant in finishing:
                row = held.add(occupant.device, occupant.item, self.steps_dispatched)
                held_source[occupant.device * per + row] = occupant.slot - occupant.device * per
                held_take[occupant.device * per + row] = True
            repack = slots.repack(resolution)  # None: nothing was released, so nothing finished either
            repacking = None
            if repack is not None:
                repacking = Repacking(repack.order, repack.live, held_source, held_take, held.counts())
            if room or repacking is not None:
                compactions.append(Compaction(resolution, room, repacking))
        return tuple(compactions)

    def _admit(self) -> tuple[Admission, ...]:
        if not admits_now(self._policy, self._slots.images):
            return ()
        admissions = []

        def place(item: WorkItem, behind: WorkItem | None = None) -> bool:
            occupant = self._slots.place(item, behind)
            if occupant is not None:
                admissions.append(Admission(item, occupant.resolution, occupant.device, occupant.slot))
            return occupant is not None

        # Backfilling is the continuous policy's; the static one stands for the recipe's FIFO batches.
        self._queue.take(place, place if self._policy != "static" else None)
        return tuple(admissions)

    def _decodes_due(self) -> tuple[Decode, ...]:
        """The banks whose held images should not wait (decode_hold.py)."""
        slots = self._slots
        decodes: list[Decode] = []
        for resolution, held in self._held.items():
            if not held:
                continue
            soonest: list[int | None] = [None] * slots.devices
            arriving = [0] * slots.devices
            for occupant in slots.occupants():
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
                self._hold_steps,
                soonest,
                arriving,
                held.capacity,
                backlog_deep=len(self._queue) >= slots.capacity,
            ):
                decodes.extend(self._take_decodes(resolution))
        return tuple(decodes)

    def _dispatch(self) -> Dispatch:
        slots = self._slots
        occupants = slots.occupants()
        k = steps_per_dispatch(
            self._sizes.steps_per_dispatch,
            [o.remaining for o in occupants],
            room_in=self.steps_until_a_queued_image_can_enter() if len(self._queue) else None,
        )
        buckets = tuple(
            (res, covering_bucket(self._sizes.rows_of(res), max(slots.block_rows(res, k))))
            for res in slots.resolutions_in_use()
        )
        return Dispatch(k, buckets, len(occupants), sum(o.rows_ahead(0) for o in occupants))

    def _take_decodes(self, resolution: Resolution) -> tuple[Decode, ...]:
        """Every image the bank holds, in calls of at most the largest decode batch: call i delivers
        held rows [i*B, (i+1)*B) of every device, in the smallest bucket covering its busiest device."""
        held = self._held[resolution]
        sizes = self._sizes.buckets[resolution]
        per_call = sizes[-1]
        rows = held.take_all()
        most = max(len(device_rows) for device_rows in rows)
        decodes = []
        for first in range(0, most, per_call):
            bucket = covering_bucket(sizes, min(per_call, most - first))
            # Kept within the block: the last call of an uneven split starts early and its first rows,
            # already delivered by the call before, are decoded again and not delivered twice.
            start = min(first, held.capacity - bucket)
            delivered = [
                [image for image in device_rows if first <= image.row < first + per_call]
                for device_rows in rows
            ]
            decodes.append(Decode(resolution, bucket, delivered, start))
        return tuple(decodes)


def steps_per_dispatch(sizes: tuple[int, ...], steps_left: list[int], *, room_in: int | None) -> int:
    """The most compiled steps per dispatch (`sizes`: 1, 2, ..., K) that no occupant overshoots (each has
    `steps_left`) and that do not outlast `room_in`, the steps until the queue's first image could enter
    (None when nothing waits); at least 1.

    Admission was decided just before, so an image still waiting has no room it may take now (its rows
    do not fit, or the static policy waits for the whole batch); until its rows free (an occupant ends,
    or its guidance interval does) it loses nothing by a longer dispatch. Under saturation this is most
    boundaries, where the per-dispatch cost matters most.
    """
    return largest_fitting(sizes, min([*steps_left, room_in if room_in is not None else min(steps_left)]))
