"""Which image sits in which batch slot: the host's mirror of the device's slot state.

Rows, not slots, are the capacity. A device runs at most `rows_per_device` UNet rows per step (2P, the
largest compiled row bucket, for P = the operator's `slots_per_device`): two for a guided image's step,
one for an unguided one's (guidance_rows.py). So a device holds P guided images, or up to 2P unguided
ones, or any mix whose rows fit. An image is admitted onto a device only if, at every future step of
every image on it (rows change when a guidance interval ends or begins, and when an image ends), the
device's rows over all its banks stay within 2P; so no step ever needs more rows than were compiled.
The stats count capacity in guided images: `capacity` (P per device) and `busy` (the rows taken, halved).

Each served resolution has its own bank of slots on the device (its programs have fixed shapes), split
into one block of `per_device` slots per device: 2P, as many as the rows, since every image takes at
least one row at each of its steps. Within a block the busy slots are kept packed at the front (a
release leaves a hole that `repack` closes; the step loop applies the returned order on the device with
the `rearrange` program), and their UNet rows are packed in slot order at the front of the device's row
batch, so that a step runs the smallest compiled row count that covers them. An admission goes to the
device, among those it fits, with the least work still to run (row-steps over every bank), so that the
devices, which step together, run out of work together.

Only the step loop's thread uses a SlotTable.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from sdxl_server.engine.api import Resolution
from sdxl_server.engine.batching.buckets import rows_per_device
from sdxl_server.engine.batching.guidance_rows import rows_over
from sdxl_server.engine.batching.tracked_request import WorkItem


@dataclasses.dataclass(eq=False)
class Occupant:
    item: WorkItem
    resolution: Resolution
    device: int
    slot: int  # global index in the bank: device * per_device (2P) + position in the block
    steps_dispatched: int = 0

    @property
    def remaining(self) -> int:
        return self.item.steps - self.steps_dispatched

    def rows_ahead(self, offset: int) -> int:
        """UNet rows of its step `offset` steps from now (0 past its end)."""
        return self.item.rows_at(self.steps_dispatched + offset)


def _with_item(device_rows: list[np.ndarray], device: int, item: WorkItem) -> list[np.ndarray]:
    """`device_rows` with `item` entering `device` now."""
    rows = device_rows[device]
    horizon = max(len(rows), item.steps)
    added = np.pad(rows, (0, horizon - len(rows))) + rows_over(item.request.guided, item.steps, 0, horizon)
    return [added if d == device else other for d, other in enumerate(device_rows)]


@dataclasses.dataclass(frozen=True)
class Repack:
    """Per-block gather indices: new position i of block d takes the slot at d*P + order[d*P + i]."""

    order: np.ndarray  # int32[total], values local to each block
    live: np.ndarray  # bool[total]


class SlotTable:
    def __init__(self, resolutions: tuple[Resolution, ...], devices: int, slots_per_device: int) -> None:
        self.devices = devices
        self.rows_per_device = rows_per_device(slots_per_device)  # 2P: the largest row bucket
        self.per_device = self.rows_per_device  # slots per block in each bank (2P: an image takes >= 1 row)
        self.total = devices * self.per_device  # slots per bank
        self.capacity = devices * slots_per_device  # in guided images (P per device): the stats' slots
        # blocks[res][d]: the occupants of device d's block in position order (the first ones packed).
        self._blocks: dict[Resolution, list[list[Occupant]]] = {
            res: [[] for _ in range(devices)] for res in resolutions
        }
        self._holes: set[Resolution] = set()  # banks whose occupants no longer match their positions
        self._images = 0

    @property
    def images(self) -> int:
        """Images in slots, over every bank."""
        return self._images

    @property
    def busy(self) -> int:
        """The capacity taken, in guided images: the rows admission counts as taken on each device (its
        most rows at any future step), summed over the devices, halved and rounded up."""
        rows = sum(int(device_rows.max(initial=0)) for device_rows in self._device_rows())
        return -(-rows // 2)

    def place(self, item: WorkItem, behind: WorkItem | None = None) -> Occupant | None:
        """Places `item` at the end of its bank's block on the device it fits best, or returns None when
        it fits on no device now (the bank must be packed: call `repack` after releases first).

        `behind`: a queued image ahead of `item` that does not fit now (the head of the line). Then
        `item` may only take a device where it does not delay the step at which `behind` could enter
        (backfilling: an image that ends, or drops to fewer rows, before `behind` needs its rows uses
        rows that would otherwise run empty, and `behind` still enters as soon as it would have)."""
        resolution = item.request.request.resolution
        if resolution in self._holes:
            raise RuntimeError("place before repack")
        blocks = self._blocks[resolution]
        device_rows = self._device_rows()
        fitting = [
            d
            for d in range(self.devices)
            if len(blocks[d]) < self.per_device and self._fits(item, device_rows[d], after=0)
        ]
        if fitting and behind is not None:
            entry = self._earliest_entry(behind, device_rows)
            fitting = [
                d for d in fitting if self._earliest_entry(behind, _with_item(device_rows, d, item)) <= entry
            ]
        if not fitting:
            return None
        # The device with the least work still to run (its row-steps over every bank): devices step
        # together, so one that runs out of work before the others idles through their rest, and the
        # images it finishes alone are decoded beside padding. Ties: the fewest rows at the next step.
        rows = self.block_rows(resolution, 1)
        device = min(fitting, key=lambda d: (int(device_rows[d].sum()), rows[d], len(blocks[d]), d))
        occupant = Occupant(item, resolution, device, device * self.per_device + len(blocks[device]))
        blocks[device].append(occupant)
        self._images += 1
        return occupant

    def steps_until_room(self, item: WorkItem | None) -> int:
        """The fewest steps after which `item` would fit on some device if nothing else entered (its
        rows, from its first step, beside what the occupants will still run then). None stands for a
        guided image as long as the longest occupant's remaining steps."""
        return self._earliest_entry(item, self._device_rows())

    def _earliest_entry(self, item: WorkItem | None, device_rows: list[np.ndarray]) -> int:
        horizon = max((len(rows) for rows in device_rows), default=0)
        for after in range(horizon + 1):
            if any(self._fits(item, rows, after) for rows in device_rows):
                return after
        return horizon  # not reached: once every occupant is done, any image fits

    def _fits(self, item: WorkItem | None, device_rows: np.ndarray, after: int) -> bool:
        """Whether `item`'s rows, starting `after` steps from now, fit beside `device_rows` (a device's
        rows at each step from now) at every step."""
        ahead = device_rows[after:]
        if item is None:
            wanted = np.full(len(ahead), 2, np.int32)
        else:
            wanted = rows_over(item.request.guided, item.steps, 0, len(ahead))
        return bool(np.all(ahead + wanted <= self.rows_per_device))

    def _device_rows(self) -> list[np.ndarray]:
        """Per device, its UNet rows over every bank at each step from now until its last image ends."""
        per_device: list[list[Occupant]] = [[] for _ in range(self.devices)]
        for occupant in self.occupants():
            per_device[occupant.device].append(occupant)
        device_rows = []
        for occupants in per_device:
            horizon = max((o.remaining for o in occupants), default=0)
            rows = np.zeros(horizon, np.int32)
            for o in occupants:
                rows += rows_over(o.item.request.guided, o.item.steps, o.steps_dispatched, horizon)
            device_rows.append(rows)
        return device_rows

    def release(self, occupant: Occupant) -> None:
        block = self._blocks[occupant.resolution][occupant.device]
        if occupant in block:
            block.remove(occupant)
            self._images -= 1
            self._holes.add(occupant.resolution)

    def repack(self, resolution: Resolution) -> Repack | None:
        """Closes the holes of a bank: the gather order that packs each block's occupants at its front
        (None if already packed). Updates the occupants' slots to their new positions."""
        if resolution not in self._holes:
            return None
        self._holes.discard(resolution)
        per = self.per_device
        order = np.tile(np.arange(per, dtype=np.int32), self.devices)
        live = np.zeros(self.total, dtype=bool)
        for device, block in enumerate(self._blocks[resolution]):
            base = device * per
            sources = [occupant.slot - base for occupant in block]
            taken = set(sources)
            free_sources = [p for p in range(per) if p not in taken]
            for position, source in enumerate(sources + free_sources):
                order[base + position] = source
            live[base : base + len(block)] = True
            for position, occupant in enumerate(block):
                occupant.slot = base + position
        return Repack(order, live)

    def block_sizes(self, resolution: Resolution) -> list[int]:
        return [len(block) for block in self._blocks[resolution]]

    def block_rows(self, resolution: Resolution, steps: int) -> list[int]:
        """Per device, the most UNet rows its block in this bank runs at any of the next `steps` steps
        (a slot's row count can change within them: its guidance interval ends or begins)."""
        return [
            max(sum(o.rows_ahead(offset) for o in block) for offset in range(steps))
            for block in self._blocks[resolution]
        ]

    def block_active_steps(self, resolution: Resolution, steps: int) -> list[int]:
        """Per device, how many of the next `steps` steps its block in this bank has an image in: the
        step program skips the UNet of a block with none (device/denoise.py), so only these run."""
        return [
            max((min(steps, o.remaining) for o in block), default=0) for block in self._blocks[resolution]
        ]

    def occupants(self) -> list[Occupant]:
        return [o for blocks in self._blocks.values() for block in blocks for o in block]

    def resolutions_in_use(self) -> list[Resolution]:
        return [res for res, blocks in self._blocks.items() if any(blocks)]
