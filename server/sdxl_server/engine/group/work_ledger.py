"""The group's own account of the work each engine has outstanding, which its routing decides on.

An engine publishes its work ahead (EngineStats.work_ahead_row_steps) only at its step boundaries, so
two requests submitted between two boundaries would both see the same engine as the least loaded. The
ledger counts a request's UNet row-steps on its engine the moment it is routed, takes them off as its
Progress events arrive, and drops the rest when it ends.
"""

from __future__ import annotations

import threading


class WorkLedger:
    """Outstanding UNet row-steps per engine. One owner of this state: the group; thread-safe."""

    def __init__(self, engines: int) -> None:
        self._outstanding = [0.0] * engines
        self._lock = threading.Lock()

    def plan(self, images: int, row_steps_per_image: int, slots: list[int]) -> list[int]:
        """Images for each engine: one at a time, each to the engine whose outstanding work per slot
        would be the least with it (the lowest index on a tie). Plans only: `add` commits."""
        with self._lock:
            work = list(self._outstanding)
        counts = [0] * len(work)
        for _ in range(images):
            chosen = min(range(len(work)), key=lambda e: ((work[e] + row_steps_per_image) / slots[e], e))
            counts[chosen] += 1
            work[chosen] += row_steps_per_image
        return counts

    def add(self, engine: int, row_steps: float) -> None:
        with self._lock:
            self._outstanding[engine] += row_steps

    def remove(self, engine: int, row_steps: float) -> None:
        with self._lock:
            # max: float sums of progress fractions may leave a hair below zero.
            self._outstanding[engine] = max(0.0, self._outstanding[engine] - row_steps)

    def outstanding(self) -> list[float]:
        with self._lock:
            return list(self._outstanding)
