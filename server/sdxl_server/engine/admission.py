"""The bounded admission queue (in images) and the two admission policies.

Submitting threads and the step loop share it under its own lock (never the step loop's work), and the
loop sleeps on its condition when there is nothing to compute.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Iterable

from sdxl_server.engine.api import QueueFullError
from sdxl_server.engine.tracking import TrackedRequest, WorkItem


class AdmissionQueue:
    def __init__(self, max_images: int) -> None:
        self.max_images = max_images
        self._items: collections.deque[WorkItem] = collections.deque()
        self.changed = threading.Condition()

    def __len__(self) -> int:
        return len(self._items)

    def put(
        self, request: TrackedRequest, retry_after: Callable[[], float], on_queued: Callable[[int], None]
    ) -> None:
        """Queues every image of `request`, or raises QueueFullError.

        `on_queued(images ahead)` runs before the step loop can see the request, so that the Queued event
        always precedes the request's first Progress.
        """
        with self.changed:
            ahead = len(self._items)
            wanted = request.request.num_images
            if ahead + wanted > self.max_images:
                raise QueueFullError(
                    f"admission queue full ({ahead} of {self.max_images} images waiting)", retry_after()
                )
            on_queued(ahead)
            self._items.extend(WorkItem(request, i) for i in range(wanted))
            self.changed.notify_all()

    def take(self, count: int) -> list[WorkItem]:
        with self.changed:
            return [self._items.popleft() for _ in range(min(count, len(self._items)))]

    def remove_where(self, doomed: Callable[[WorkItem], bool]) -> list[WorkItem]:
        """Removes and returns the queued items for which `doomed` is true."""
        with self.changed:
            removed = [item for item in self._items if doomed(item)]
            if removed:
                kept = [item for item in self._items if not doomed(item)]
                self._items = collections.deque(kept)
            return removed

    def pending_steps(self) -> int:
        with self.changed:
            return sum(item.steps for item in self._items)

    def drain(self) -> list[WorkItem]:
        with self.changed:
            items = list(self._items)
            self._items.clear()
            return items

    def wake(self) -> None:
        with self.changed:
            self.changed.notify_all()

    def wait_for_work(self, timeout: float) -> None:
        """Sleeps until something is queued or `wake` is called (or `timeout` passes)."""
        with self.changed:
            if not self._items:
                self.changed.wait(timeout)


def admittable(policy: str, free_slots: int, busy_slots: int) -> int:
    """How many queued images may enter slots at this step boundary.

    continuous: any free slot, at every boundary. static: a new batch only once every slot is free
    (the reference recipe's whole-batch behaviour, kept for comparison).
    """
    if policy == "static" and busy_slots > 0:
        return 0
    return free_slots


def requests_of(items: Iterable[WorkItem]) -> list[TrackedRequest]:
    """The distinct requests of `items`, in first-seen order."""
    seen: dict[int, TrackedRequest] = {}
    for item in items:
        seen.setdefault(id(item.request), item.request)
    return list(seen.values())
