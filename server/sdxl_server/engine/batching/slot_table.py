"""Which image sits in which batch slot: the host's mirror of the device's slot state.

Each served resolution has its own bank of slots on the device (its programs have fixed shapes), split
into one block of `per_device` slots per device. The slots are one budget: at most `total` images are in
flight across all banks. Within a block the busy slots are kept packed at the front (a release leaves a
hole that `repack` closes; the step loop applies the returned order on the device with the `rearrange`
program), and their UNet rows are packed in slot order at the front of the device's row batch (one row
for an unguided step, two for a guided one: guidance_rows.py), so that a step runs the smallest compiled
row count that covers them. An admission goes to the device whose block in that bank has the fewest rows
at its next step.

Only the step loop's thread uses a SlotTable.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from sdxl_server.engine.api import Resolution
from sdxl_server.engine.batching.tracked_request import WorkItem


@dataclasses.dataclass(eq=False)
class Occupant:
    item: WorkItem
    resolution: Resolution
    device: int
    slot: int  # global index in the bank: device * per_device + position in the block
    steps_dispatched: int = 0

    @property
    def remaining(self) -> int:
        return self.item.steps - self.steps_dispatched

    def rows_ahead(self, offset: int) -> int:
        """UNet rows of its step `offset` steps from now (0 past its end)."""
        return self.item.rows_at(self.steps_dispatched + offset)


@dataclasses.dataclass(frozen=True)
class Repack:
    """Per-block gather indices: new position i of block d takes the slot at d*P + order[d*P + i]."""

    order: np.ndarray  # int32[total], values local to each block
    live: np.ndarray  # bool[total]


class SlotTable:
    def __init__(self, resolutions: tuple[Resolution, ...], devices: int, per_device: int) -> None:
        self.devices = devices
        self.per_device = per_device
        self.total = devices * per_device
        # blocks[res][d]: the occupants of device d's block in position order (the first ones packed).
        self._blocks: dict[Resolution, list[list[Occupant]]] = {
            res: [[] for _ in range(devices)] for res in resolutions
        }
        self._holes: set[Resolution] = set()  # banks whose occupants no longer match their positions
        self._busy = 0

    @property
    def busy(self) -> int:
        return self._busy

    @property
    def free(self) -> int:
        return self.total - self._busy

    def assign(self, item: WorkItem) -> Occupant:
        """Places `item` at the end of the least-loaded block of its resolution's bank (the bank must be
        packed: call `repack` after releases first)."""
        if self.free <= 0:
            raise RuntimeError("no free slot")
        resolution = item.request.request.resolution
        if resolution in self._holes:
            raise RuntimeError("assign before repack")
        blocks = self._blocks[resolution]
        load_elsewhere = self.device_loads()
        rows = self.block_rows(resolution, 1)
        device = min(
            (d for d in range(self.devices) if len(blocks[d]) < self.per_device),
            key=lambda d: (rows[d], len(blocks[d]), load_elsewhere[d], d),
        )
        occupant = Occupant(item, resolution, device, device * self.per_device + len(blocks[device]))
        blocks[device].append(occupant)
        self._busy += 1
        return occupant

    def release(self, occupant: Occupant) -> None:
        block = self._blocks[occupant.resolution][occupant.device]
        if occupant in block:
            block.remove(occupant)
            self._busy -= 1
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

    def device_loads(self) -> list[int]:
        """Busy slots per device, over every bank."""
        return [sum(len(blocks[d]) for blocks in self._blocks.values()) for d in range(self.devices)]

    def occupants(self) -> list[Occupant]:
        return [o for blocks in self._blocks.values() for block in blocks for o in block]

    def resolutions_in_use(self) -> list[Resolution]:
        return [res for res, blocks in self._blocks.items() if any(blocks)]
