"""A fake engine for in-process service tests: the ``Engine`` Protocol of sdxl_server/engine/api.py, no JAX.

It keeps the real engine's contract where the service can see it: ``submit`` admits at once or raises an
admission error, events reach the request's listener from another thread (as the step loop's do) in the
contract's order (Queued, then Progress and ImageReady, then exactly one of Finished / Failed), and
``cancel`` ends a request with ``Failed(CancelledError)``. What a test chooses:

- ``refuse_with``: an error ``submit`` raises (admission refused: the engine's own queue check, ...);
- ``fail_with``: an error the request ends with after its first step (``Failed``);
- ``hold``: requests stop after their first step until cancelled or ``release()``d;
- ``stats_snapshot`` and ``estimate``: what the service's admission reads before submitting.

What it records: ``requests`` (submitted, in order), ``cancelled`` (request ids, in order), and
``wait_for_request`` / ``wait_for_cancel`` to wait for them from a test without sleeping. ``AdmittedRequests``
waits for the service's side of an admission.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading

from sdxl_server.engine import api

LIMITS = api.Limits(
    resolutions=(api.Resolution(64, 64), api.Resolution(128, 64)),
    min_steps=1,
    max_steps=20,
    default_steps=4,
    min_guidance_scale=0.0,
    max_guidance_scale=20.0,
    default_guidance_scale=5.0,
    max_images_per_request=4,
    max_prompt_tokens=300,
    max_queue=16,
)
IDLE = api.EngineStats(
    queue_depth=0,
    slots_busy=0,
    slots_total=4,
    load=0.0,
    steps_total=0,
    images_total=0,
    step_seconds_ewma=0.0,
    device_busy_ratio=0.0,
    compile_seconds=0.0,
    startup_seconds=0.0,
    ready=True,
    healthy=True,
)
WAIT_SECONDS = 30.0  # how long a test waits for something the service must do at once


def image_bytes(request_id: str, index: int) -> bytes:
    """What the fake "encodes" for image ``index`` of a request: tells the images apart in responses."""
    return f"image {index} of {request_id}".encode()


@dataclasses.dataclass(frozen=True)
class FakeTicket:
    request_id: str


class FakeEngine:
    def __init__(self, limits: api.Limits = LIMITS, stats_snapshot: api.EngineStats = IDLE) -> None:
        self.limits = limits
        self.stats_snapshot = stats_snapshot
        self.estimate: float | None = None
        self.refuse_with: api.EngineError | None = None
        self.fail_with: api.EngineError | None = None
        self.hold = False
        self.requests: list[api.GenerationRequest] = []
        self.cancelled: list[str] = []
        self._changed = threading.Condition()
        self._released = False

    # ---- the Engine Protocol

    def info(self) -> api.EngineInfo:
        return api.EngineInfo(
            model="fake-sdxl",
            limits=self.limits,
            slots=self.stats_snapshot.slots_total,
            devices=1,
            device_kind="fake",
            policy="continuous",
            dtype="float32",
            versions={"fake-engine": "1"},
        )

    def start(self) -> None:
        pass

    def submit(self, request: api.GenerationRequest, listener: api.Listener) -> FakeTicket:
        if self.refuse_with is not None:
            raise self.refuse_with
        with self._changed:
            self.requests.append(request)
            self._changed.notify_all()
        worker = threading.Thread(target=self._run, args=(request, listener), name="fake-engine", daemon=True)
        worker.start()
        return FakeTicket(request.request_id)

    def cancel(self, ticket: api.Ticket) -> None:
        with self._changed:
            self.cancelled.append(ticket.request_id)
            self._changed.notify_all()

    def stats(self) -> api.EngineStats:
        return self.stats_snapshot

    def estimate_seconds(
        self, num_images: int, steps: int, resolution: api.Resolution | None = None, rows_per_image: int = 2
    ) -> float | None:
        return self.estimate

    def stop(self, drain_seconds: float = 0.0) -> None:
        pass

    # ---- for tests

    def release(self) -> None:
        """Lets held requests (and later ones) run to the end."""
        with self._changed:
            self._released = True
            self._changed.notify_all()

    def wait_for_request(self, count: int = 1) -> api.GenerationRequest:
        """The ``count``-th admitted request, once it was submitted."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self.requests) >= count, WAIT_SECONDS):
                raise AssertionError(f"no request {count} reached the engine within {WAIT_SECONDS}s")
            return self.requests[count - 1]

    def wait_for_cancel(self, request_id: str) -> None:
        with self._changed:
            if not self._changed.wait_for(lambda: request_id in self.cancelled, WAIT_SECONDS):
                raise AssertionError(f"request {request_id} was not cancelled within {WAIT_SECONDS}s")

    # ---- the "engine thread" of one request

    def _run(self, request: api.GenerationRequest, listener: api.Listener) -> None:
        total = request.steps * request.num_images
        listener(api.Queued(position=0, prompt_truncated=False))
        listener(api.Progress(completed_steps=request.num_images, total_steps=total))
        with self._changed:
            self._changed.wait_for(
                lambda: not self.hold or self._released or request.request_id in self.cancelled,
                WAIT_SECONDS * 10,
            )
            cancelled = request.request_id in self.cancelled
        if cancelled:
            listener(api.Failed(api.CancelledError(f"request {request.request_id} was cancelled")))
            return
        if self.fail_with is not None:
            listener(api.Failed(self.fail_with))
            return
        for step in range(2, request.steps + 1):
            listener(api.Progress(completed_steps=step * request.num_images, total_steps=total))
        width, height = request.resolution.width, request.resolution.height
        for index in reversed(range(request.num_images)):  # any order: the service sorts by index
            data = image_bytes(request.request_id, index)
            listener(api.ImageReady(index, request.seed + index, data, request.image_format, width, height))
        listener(api.Finished(queue_seconds=0.25, denoise_seconds=0.5, total_seconds=0.75))


class AdmittedRequests(logging.Handler):
    """Wakes a test when the service has admitted a request (its "admitted" log line, written right after
    ``engine.submit`` returned and the caller's going-away was wired to ``engine.cancel``).

    A caller that goes away earlier, while the request is being submitted, is another case (see
    ``service/generation.py``); a test of what a cancel does waits for this first. Use in the event loop's
    thread: ``async with AdmittedRequests() as admitted: ...; await admitted.wait(1)``.
    """

    LOGGER = "sdxl_server.service.generation"

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.request_ids: list[str] = []
        self._changed = asyncio.Condition()
        self._logger = logging.getLogger(self.LOGGER)
        self._level = self._logger.level

    def emit(self, record: logging.LogRecord) -> None:  # the event loop's thread, inside the service
        fields = getattr(record, "fields", {})
        if fields.get("event") == "admitted":
            self.request_ids.append(fields["request_id"])
            asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def wait(self, count: int = 1) -> str:
        """The ``count``-th admitted request's id, once admitted."""
        async with self._changed:
            await asyncio.wait_for(
                self._changed.wait_for(lambda: len(self.request_ids) >= count), WAIT_SECONDS
            )
        return self.request_ids[count - 1]

    async def __aenter__(self) -> AdmittedRequests:
        self._logger.addHandler(self)
        self._logger.setLevel(logging.INFO)  # the line is INFO; a quieter logger would drop it unseen
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._logger.removeHandler(self)
        self._logger.setLevel(self._level)
