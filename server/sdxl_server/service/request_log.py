"""What the server's log says about requests: one line when an admitted request ends, and rejections
summarised instead of one line each.

Every admitted request ends with a ``request done`` line (``event=done``) carrying its status, latency,
steps and images, whatever the front door. Requests refused before admission (bad fields, a full queue,
warming up or draining) can arrive by the thousand per second under overload, so they are rate-limited:
the first of each kind in a window (a status code, and for INVALID_ARGUMENT the fields named) is logged
at once with its reason (``event=rejected``), and the others are counted and reported in one summary
line (``event=rejections``) when the window ends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable

from google.rpc import error_details_pb2

from sdxl_server.engine import api
from sdxl_server.logs import fields
from sdxl_server.service.status_mapping import ServiceError
from sdxl_server.service.time_budget import TimeBudget

log = logging.getLogger("sdxl_server.requests")

SUMMARY_WINDOW_SECONDS = 10.0
_LEVELS = {"OK": logging.INFO, "CANCELLED": logging.INFO, "INTERNAL": logging.ERROR}


def log_done(
    request: api.GenerationRequest,
    code: str,
    latency_seconds: float,
    finished: api.Finished | None,
    unknown_words: tuple[str, ...] = (),
    budget: TimeBudget | None = None,
) -> None:
    """The completion line of an admitted request; ``finished`` is None when it did not finish.
    ``unknown_words``: the prompts' words a closed-vocabulary model (the demo) does not know; ``budget``:
    where a finished request's time went, one ``<phase>_s`` field per phase (time_budget.py)."""
    extra = {
        "event": "done",
        "request_id": request.request_id,
        "status": code,
        "latency_s": round(latency_seconds, 4),
        "steps": request.steps,
        "images": request.num_images,
        "resolution": str(request.resolution),
    }
    if finished is not None:
        extra.update(queue_s=round(finished.queue_seconds, 4), denoise_s=round(finished.denoise_seconds, 4))
    if budget is not None:
        extra.update(budget.log_fields())
    if unknown_words:
        extra["unknown_words"] = " ".join(unknown_words)
    message = "request done" if code == "OK" else f"request ended: {code}"
    log.log(_LEVELS.get(code, logging.WARNING), message, extra=fields(**extra))


class RejectionLog:
    """Rate-limited log of requests refused before admission. Used from the event loop's thread only.

    Args:
        window_seconds: Length of a summary window.
        clock: Monotonic clock (replaceable in tests).
    """

    def __init__(
        self, window_seconds: float = SUMMARY_WINDOW_SECONDS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._window = window_seconds
        self._clock = clock
        self._window_started = -window_seconds
        self._shown: set[str] = set()
        self._suppressed: Counter[str] = Counter()
        self._last_reason: dict[str, str] = {}
        self._flush_scheduled = False

    def record(self, error: ServiceError) -> None:
        """Logs or counts one rejection. Bad requests are told apart by their fields (a client sending
        a bad size is not hidden behind another sending bad steps); other codes by code alone."""
        code, reason = error.code.name, error.message
        kind = code + "".join(
            f" {violation.field}"
            for detail in error.details
            if isinstance(detail, error_details_pb2.BadRequest)
            for violation in detail.field_violations
        )
        now = self._clock()
        if now - self._window_started >= self._window:
            self.flush()
            self._window_started = now
            self._shown.clear()
        if kind not in self._shown:
            self._shown.add(kind)
            log.info(
                f"request rejected: {code}: {reason} (more like it in the next "
                f"{self._window:g} s are counted, not logged)",
                extra=fields(event="rejected", status=code, reason=reason),
            )
            return
        self._suppressed[code] += 1
        self._last_reason[code] = reason
        self._schedule_flush(self._window_started + self._window - now)

    def flush(self) -> None:
        """Logs the counts of the rejections not logged yet, if any."""
        self._flush_scheduled = False
        if not self._suppressed:
            return
        counts = dict(self._suppressed)
        text = ", ".join(
            f"{code} {count} (last: {self._last_reason[code]})" for code, count in counts.items()
        )
        log.info(
            f"{sum(counts.values())} more requests rejected in the last {self._window:g} s: {text}",
            extra=fields(event="rejections", counts=counts, window_s=self._window),
        )
        self._suppressed.clear()
        self._last_reason.clear()

    def _schedule_flush(self, delay: float) -> None:
        if self._flush_scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a unit test): the next record after the window flushes
            return
        self._flush_scheduled = True
        loop.call_later(max(0.0, delay), self.flush)
