"""Finished latents waiting for a decode, and when to decode them.

A decode is one SPMD program over every device; each device runs the VAE on its own held images only
(none: it skips the pass), so an uneven decode no longer costs the others padding, but each call still
costs a dispatch and a VAE pass on its devices, and a pass over fewer images is less efficient per image
(on real SDXL at 1024x1024 a pass of one image costs about one guided step). The seed's recipe decodes
a whole batch on every device at once. So a finished image's latents are
moved out of its slot into its device's held buffer (the slot is free for the next image at once), and
the decode may wait, within a budget of `hold_steps` denoising steps, for as long as a device that holds
nothing has an image that will finish in time. It never waits when waiting cannot help: one device, no
other work in flight, or every device already holding an image.

The hold trades the held image's latency (up to `hold_steps` steps) for throughput (fewer, fuller
decodes), so it engages only when throughput is what the server lacks: when the backlog is deep, i.e. at
least as many images wait in the queue as there are slots, enough to refill every slot that frees during
the hold. With a shallow queue (Poisson load below capacity: a few images wait now and then) the devices
catch up anyway and the wait is pure latency; measured at 70% Poisson load, a hold that engaged whenever
anything was queued cost more p99 (2.64 s) than deciding at once (2.27 s), while without any hold a
saturated burst fell from 1.01 to 0.91 of the recipe's throughput (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import dataclasses

from sdxl_server.engine.batching.tracked_request import WorkItem


@dataclasses.dataclass(frozen=True)
class HeldImage:
    item: WorkItem
    row: int  # row in its device's held buffer
    since_step: int  # the step loop's step count when its last step was dispatched


class HeldImages:
    """One bank's held buffers, per device; only the step loop's thread uses it."""

    def __init__(self, devices: int, capacity: int) -> None:
        self.capacity = capacity  # rows per device
        self._rows: list[list[HeldImage]] = [[] for _ in range(devices)]

    def add(self, device: int, item: WorkItem, since_step: int) -> int:
        rows = self._rows[device]
        if len(rows) >= self.capacity:
            raise RuntimeError("held buffer full: decode before stashing more")
        rows.append(HeldImage(item, len(rows), since_step))
        return len(rows) - 1

    def counts(self) -> list[int]:
        return [len(rows) for rows in self._rows]

    def oldest_step(self) -> int | None:
        return min((rows[0].since_step for rows in self._rows if rows), default=None)

    def take_all(self) -> list[list[HeldImage]]:
        rows, self._rows = self._rows, [[] for _ in self._rows]
        return rows

    def __bool__(self) -> bool:
        return any(self._rows)


def decode_now(
    held: list[int],
    waited_steps: int,
    hold_steps: int,
    soonest_finish: list[int | None],
    arriving: list[int],
    capacity: int,
    backlog_deep: bool = True,
) -> bool:
    """Whether to decode a bank's held images at this boundary.

    held[d]: images held on device d; waited_steps: steps since the oldest was finished; soonest_finish[d]:
    the fewest steps any image in device d's block still needs (None if the block is empty); arriving[d]:
    images that may finish on device d at the next dispatch (they need room in its buffer);
    backlog_deep: whether enough images wait in the queue to refill every slot that frees during the
    hold (the step loop: queued images >= slots); without such a backlog the hold is pure latency."""
    if not any(held):
        return False
    if waited_steps >= hold_steps or not backlog_deep:
        return True
    if any(h + a > capacity for h, a in zip(held, arriving, strict=True)):
        return True
    budget = hold_steps - waited_steps
    # Wait only if some device holding nothing will have a finished image within the budget.
    return not any(
        h == 0 and soon is not None and soon <= budget for h, soon in zip(held, soonest_finish, strict=True)
    )
