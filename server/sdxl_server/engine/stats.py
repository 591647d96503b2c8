"""Engine statistics published as immutable snapshots: readers never take the step loop's lock."""

from __future__ import annotations

import dataclasses
import threading

from sdxl_server.engine.api import EngineStats


@dataclasses.dataclass
class Counters:
    steps_total: int = 0  # batched step dispatches x steps each, counted per image slot that advanced
    images_total: int = 0
    compile_seconds: float = 0.0
    startup_seconds: float = 0.0
    ready: bool = False
    healthy: bool = True


class StatsBoard:
    def __init__(self, slots_total: int) -> None:
        self.counters = Counters()
        self._slots_total = slots_total
        self._publish_lock = threading.Lock()  # orders publishers; readers take no lock
        self._snapshot = self._build(0, 0, 0.0, 0.0)

    def set_slots_total(self, slots_total: int) -> None:
        self._slots_total = slots_total

    def publish(self, queue_depth: int, slots_busy: int, step_seconds: float, busy_ratio: float) -> None:
        with self._publish_lock:
            self._snapshot = self._build(queue_depth, slots_busy, step_seconds, busy_ratio)

    def snapshot(self) -> EngineStats:
        return self._snapshot

    def _build(
        self, queue_depth: int, slots_busy: int, step_seconds: float, busy_ratio: float
    ) -> EngineStats:
        c = self.counters
        total = self._slots_total
        return EngineStats(
            queue_depth=queue_depth,
            slots_busy=slots_busy,
            slots_total=total,
            load=(queue_depth + slots_busy) / total if total else 0.0,
            steps_total=c.steps_total,
            images_total=c.images_total,
            step_seconds_ewma=step_seconds,
            device_busy_ratio=busy_ratio,
            compile_seconds=c.compile_seconds,
            startup_seconds=c.startup_seconds,
            ready=c.ready,
            healthy=c.healthy,
        )
