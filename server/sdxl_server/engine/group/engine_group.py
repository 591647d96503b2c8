"""`EngineGroup`: an engine per device behind one `api.Engine`, and `engine_for`, which builds what the
settings ask for (one engine over every device, or a group).

Why: the lockstep engine's devices step together, so each pays the busiest one's row bucket and a
decode on one holds all. Engines apart step on their own clocks (docs/PERFORMANCE.md, "An engine per
device"). What it costs: each engine compiles its own programs (a program is bound to its device), and
an engine's queue is its own: a request waits on the engine it was routed to, which is why routing
counts work, not requests (work_ledger.py).

The group owns the routing ledger and the map of requests to their parts (each part's ticket is held
by its SplitRequest); every other piece of state belongs to an engine. The model is loaded once and
shared: each engine places the same host copy on its own device.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable

from sdxl_server.engine.api import (
    EngineInfo,
    EngineStats,
    GenerationRequest,
    Listener,
    Resolution,
    Ticket,
)
from sdxl_server.engine.batching.guidance_rows import guided_steps, row_steps
from sdxl_server.engine.device.mesh import make_mesh
from sdxl_server.engine.group.merged_stats import Histogram, merge_histograms, merge_stats
from sdxl_server.engine.group.split_request import Part, SplitRequest
from sdxl_server.engine.group.work_ledger import WorkLedger
from sdxl_server.engine.jax_engine import JaxEngine, load_engine_model
from sdxl_server.engine.models.loader import LoadedModel
from sdxl_server.engine.settings import EngineConfig

log = logging.getLogger(__name__)


def engine_for(
    config: EngineConfig, *, clock: Callable[[], float] = time.monotonic
) -> JaxEngine | EngineGroup:
    """The engine the settings describe: one over the devices, or with ``engine_per_device`` a group of
    one engine per device (the devices `first_device` on, at most `max_devices` of them; one device is
    the plain engine)."""
    if not config.engine_per_device:
        return JaxEngine(config, clock=clock)
    devices = make_mesh(config.max_devices, config.first_device).size  # SettingError past the last one
    if devices == 1:
        return JaxEngine(config, clock=clock)  # nothing to keep apart
    load = _SharedLoad()
    engines = [
        JaxEngine(
            dataclasses.replace(config, max_devices=1, first_device=config.first_device + i),
            clock=clock,
            load=load,
        )
        for i in range(devices)
    ]
    return EngineGroup(engines, on_started=load.release)


class _SharedLoad:
    """The model, loaded on the first engine's start and handed to the others (start is sequential)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._model: LoadedModel | None = None

    def __call__(self, config: EngineConfig) -> LoadedModel:
        with self._lock:
            if self._model is None:
                self._model = load_engine_model(config)
            return self._model

    def release(self) -> None:
        """Every engine has its model: the group keeps no reference of its own."""
        with self._lock:
            self._model = None


class EngineGroup:
    """Engines of one device each, as one `api.Engine` to the service."""

    def __init__(self, engines: list[JaxEngine], on_started: Callable[[], None] = lambda: None) -> None:
        if not engines:
            raise ValueError("an engine group needs at least one engine")
        self.engines = engines
        self._ledger = WorkLedger(len(engines))
        self._on_started = on_started

    # ---- lifecycle

    def start(self) -> None:
        """Starts the engines one after another: JAX's compilation cache and the program cache count
        their hits process-wide, and on a TPU host the compiler already uses many cores."""
        began = time.monotonic()
        try:
            for engine in self.engines:
                engine.start()
        except BaseException:
            self.stop()
            raise
        finally:
            self._on_started()
        log.info(
            "engine group ready: %d engines of one device each in %.1fs",
            len(self.engines),
            time.monotonic() - began,
        )

    def stop(self, drain_seconds: float = 0.0) -> None:
        """Stops every engine at once, so the drain is `drain_seconds`, not that times the engines."""
        threads = [
            threading.Thread(target=engine.stop, args=(drain_seconds,), name=f"stop-engine-{i}")
            for i, engine in enumerate(self.engines)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    # ---- the interface

    def info(self) -> EngineInfo:
        infos = [engine.info() for engine in self.engines]
        resident = {a.name for info in infos for a in info.adapters if a.resident}
        return dataclasses.replace(
            infos[0],
            slots=sum(info.slots for info in infos),
            devices=sum(info.devices for info in infos),
            engines=len(infos),
            adapters=tuple(dataclasses.replace(a, resident=a.name in resident) for a in infos[0].adapters),
        )

    def submit(self, request: GenerationRequest, listener: Listener) -> Ticket:
        """Splits the request's images over the engines by the ledger, submits each part, and hands
        back the ticket of the whole; a part refused (queue full, deadline, not ready) refuses all."""
        cost = row_steps(
            guided_steps(request.guidance_scale, request.guidance_interval, request.steps), request.steps
        )
        split = SplitRequest(
            request.request_id, listener, self._parts(request.num_images, request.steps, cost),
            self._ledger.remove, self._cancel_part,
        )  # fmt: skip
        for part in split.parts:
            self._ledger.add(part.engine, part.row_steps)
            part_request = dataclasses.replace(request, num_images=part.count, seed=request.seed + part.first)
            try:
                part.ticket = self.engines[part.engine].submit(part_request, split.listener_of(part))
            except Exception:
                self._ledger.remove(part.engine, part.row_steps)
                split.drop()
                raise
        split.open()
        return split

    def cancel(self, ticket: Ticket) -> None:
        if isinstance(ticket, SplitRequest) and not ticket.terminal:
            ticket.cancel()

    def stats(self) -> EngineStats:
        return merge_stats(self.engine_stats())

    def engine_stats(self) -> list[EngineStats]:
        """Each engine's own snapshot, in device order (the per-engine metrics)."""
        return [engine.stats() for engine in self.engines]

    def estimate_seconds(
        self, num_images: int, steps: int, resolution: Resolution | None = None, rows_per_image: int = 2
    ) -> float | None:
        """The slowest part's estimate, the request split as `submit` would split it now."""
        estimates = [
            self.engines[part.engine].estimate_seconds(part.count, steps, resolution, rows_per_image)
            for part in self._parts(num_images, steps, rows_per_image * steps)
        ]
        if any(e is None for e in estimates):
            return None
        return max(e for e in estimates if e is not None)

    def step_histogram(self) -> Histogram | None:
        return merge_histograms([engine.step_histogram() for engine in self.engines])

    # ---- internals

    def _parts(self, images: int, steps: int, row_steps_per_image: int) -> list[Part]:
        slots = [max(engine.stats().slots_total, 1) for engine in self.engines]
        counts = self._ledger.plan(images, row_steps_per_image, slots)
        parts, first = [], 0
        for engine, count in enumerate(counts):
            if count:
                parts.append(Part(engine, first, count, steps * count, row_steps_per_image * count))
                first += count
        return parts

    def _cancel_part(self, part: Part) -> None:
        self.engines[part.engine].cancel(part.ticket)
