"""Which image sits in which batch slot: the host's mirror of the device's slot state.

Each served resolution has its own bank of `total` physical slots on the device (its programs have fixed
shapes), but the slots are one budget: at most `total` images are in flight across all banks, because
every bank with work costs a full batched step.
"""

from __future__ import annotations

import dataclasses

from sdxl_server.engine.api import Resolution
from sdxl_server.engine.tracking import WorkItem


@dataclasses.dataclass(eq=False)
class Occupant:
    item: WorkItem
    resolution: Resolution
    slot: int
    steps_dispatched: int = 0

    @property
    def remaining(self) -> int:
        return self.item.steps - self.steps_dispatched


class SlotTable:
    def __init__(self, resolutions: tuple[Resolution, ...], total: int) -> None:
        self.total = total
        self._banks: dict[Resolution, list[Occupant | None]] = {res: [None] * total for res in resolutions}
        self._busy = 0

    @property
    def busy(self) -> int:
        return self._busy

    @property
    def free(self) -> int:
        return self.total - self._busy

    def assign(self, item: WorkItem) -> Occupant:
        if self.free <= 0:
            raise RuntimeError("no free slot")
        bank = self._banks[item.request.request.resolution]
        slot = bank.index(None)  # a bank has `total` slots, so one is free whenever the budget is not spent
        occupant = Occupant(item, item.request.request.resolution, slot)
        bank[slot] = occupant
        self._busy += 1
        return occupant

    def release(self, occupant: Occupant) -> None:
        bank = self._banks[occupant.resolution]
        if bank[occupant.slot] is occupant:
            bank[occupant.slot] = None
            self._busy -= 1

    def occupants(self) -> list[Occupant]:
        return [o for bank in self._banks.values() for o in bank if o is not None]

    def resolutions_in_use(self) -> list[Resolution]:
        return [res for res, bank in self._banks.items() if any(o is not None for o in bank)]
