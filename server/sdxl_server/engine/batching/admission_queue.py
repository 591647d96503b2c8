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

    def take(self, count: int) -> list[WorkItem]:
        return [self._waiting.popleft() for _ in range(min(count, len(self._waiting)))]

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


def admittable(policy: str, free_slots: int, busy_slots: int) -> int:
    """How many queued images may enter slots at this step boundary.

    continuous: any free slot, at every boundary. static: a new batch only once every slot is free
    (the reference recipe's whole-batch behaviour, kept for comparison).
    """
    if policy == "static" and busy_slots > 0:
        return 0
    return free_slots
