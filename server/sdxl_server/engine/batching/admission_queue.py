"""The bounded admission queue (in images) and the two admission policies.

Ownership: submitting threads only `put` (room is reserved in the stats board's ledger, so a full queue
is refused at once and atomically) and `wake`; what waits in the queue belongs to the step loop, which
moves new arrivals in with `receive` at each boundary and is the only one to take or remove items. The
loop sleeps on the queue's condition when there is nothing to compute.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable

from sdxl_server.engine.api import QueueFullError
from sdxl_server.engine.batching.tracked_request import TrackedRequest, WorkItem
from sdxl_server.engine.stats import StatsBoard


class AdmissionQueue:
    def __init__(self, max_images: int, board: StatsBoard) -> None:
        self.max_images = max_images
        self._board = board
        self._arrivals: collections.deque[WorkItem] = collections.deque()  # under `changed`
        self._waiting: collections.deque[WorkItem] = collections.deque()  # the step loop's alone
        self.changed = threading.Condition()
        # Whether a queued image may take a slot now (the step loop's: its LoRA adapters are resident,
        # engine/adapters/adapter_loads.py). One that may not keeps its place while later ones pass it.
        self.admissible: Callable[[WorkItem], bool] | None = None

    # ---- any thread

    def put(
        self, request: TrackedRequest, retry_after: Callable[[], float], on_queued: Callable[[int], None]
    ) -> None:
        """Queues every image of `request`, or raises QueueFullError.

        `on_queued(images ahead)` runs before the step loop can see the request, so that the Queued event
        always precedes the request's first Progress.
        """
        wanted = request.request.num_images
        ahead = self._board.reserve(wanted, self.max_images)
        if ahead is None:
            waiting = self._board.waiting()
            raise QueueFullError(
                f"admission queue full ({waiting} of {self.max_images} images waiting)", retry_after()
            )
        on_queued(ahead)
        with self.changed:
            self._arrivals.extend(WorkItem(request, i) for i in range(wanted))
            self.changed.notify_all()

    def wake(self) -> None:
        with self.changed:
            self.changed.notify_all()

    # ---- the step loop only

    def receive(self) -> None:
        """Moves the images submitted since the last boundary into the queue, in submission order."""
        with self.changed:
            self._waiting.extend(self._arrivals)
            self._arrivals.clear()

    def __len__(self) -> int:
        return len(self._waiting)

    def take(
        self,
        place: Callable[[WorkItem], bool],
        place_behind: Callable[[WorkItem, WorkItem], bool] | None = None,
    ) -> list[WorkItem]:
        """Offers the queued images that are admissible to `place`, in queue order, and removes and
        returns those it took (it gives each a slot), up to the first it refuses: the head of the line.

        Head of line waits: smaller images behind it must not keep taking the rows it waits for and
        starve it. They are offered to `place_behind(item, head)` instead (none is taken without it),
        which takes one only where it cannot delay the head's entry (backfilling: slot_table.place with
        `behind`), and the head enters as soon as it would have. Images of a shape already refused
        behind the head are not offered again until something was taken (a long queue of one shape
        costs one check). An image that is not admissible yet (its adapters are loading) lets later
        ones pass."""
        taken: list[WorkItem] = []
        kept: collections.deque[WorkItem] = collections.deque()
        head: WorkItem | None = None
        refused: set[tuple[object, ...]] = set()
        for item in self._waiting:
            if self.admissible is not None and not self.admissible(item):
                kept.append(item)
            elif head is None:
                if place(item):
                    taken.append(item)
                else:
                    head = item
                    kept.append(item)
            elif place_behind is None or _shape(item) in refused:
                kept.append(item)
            elif place_behind(item, head):
                taken.append(item)
                refused.clear()
            else:
                refused.add(_shape(item))
                kept.append(item)
        self._waiting = kept
        return taken

    def remove_where(self, doomed: Callable[[WorkItem], bool]) -> list[WorkItem]:
        """Removes and returns the queued items for which `doomed` is true (evaluated once per item)."""
        kept: collections.deque[WorkItem] = collections.deque()
        removed: list[WorkItem] = []
        for item in self._waiting:
            (removed if doomed(item) else kept).append(item)
        self._waiting = kept
        return removed

    def items(self) -> list[WorkItem]:
        return list(self._waiting)

    def drain(self) -> list[WorkItem]:
        """Everything still queued or arriving (after the step loop has stopped)."""
        self.receive()
        items = list(self._waiting)
        self._waiting.clear()
        return items

    def wait_for_work(self, timeout: float) -> None:
        """Sleeps until something arrives or `wake` is called (or `timeout` passes)."""
        with self.changed:
            if not self._arrivals:
                self.changed.wait(timeout)


def _shape(item: WorkItem) -> tuple[object, ...]:
    """What decides where an image fits: its resolution, steps and guided steps."""
    request = item.request
    return (request.request.resolution, item.steps, request.guided)


def admits_now(policy: str, images_in_slots: int) -> bool:
    """Whether queued images may enter slots at this step boundary (as many as their rows fit).

    continuous: at every boundary. static: a new batch only once every slot is free (the reference
    recipe's whole-batch behaviour, kept for comparison).
    """
    return policy != "static" or images_in_slots == 0
