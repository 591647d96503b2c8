"""Per-request bookkeeping shared by the admission queue, the step loop and the image workers."""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from sdxl_server.engine.adapters.request_adapters import NO_ADAPTERS
from sdxl_server.engine.api import EngineEvent, Failed, Finished, GenerationRequest, Listener
from sdxl_server.engine.batching.guidance_rows import guided_steps, row_steps, rows_at
from sdxl_server.engine.prompt_cache import PromptKey
from sdxl_server.engine.request_budget import RequestBudget

log = logging.getLogger(__name__)


class TrackedRequest:
    """One admitted request; also the `Ticket` handed back by `submit` (it has `request_id`).

    Events reach the listener one at a time (a per-request lock), and nothing follows the terminal
    event (Finished or Failed): whichever thread delivers it first wins, later deliveries are dropped.
    """

    def __init__(
        self,
        request: GenerationRequest,
        listener: Listener,
        token_ids: np.ndarray,
        zero_negative: bool,
        submitted_at: float,
        on_terminal: Callable[[TrackedRequest], None] | None = None,
    ) -> None:
        self.request = request
        self.request_id = request.request_id
        self.listener = listener
        self.token_ids = token_ids  # int32[2 (negative, prompt), 2 encoders, tokens]
        self.zero_negative = zero_negative
        self.prompt_key = PromptKey.of(token_ids, zero_negative)  # the prompt-embedding cache's key
        self.budget = RequestBudget()  # where its time goes, filled in by the threads that spend it
        self.submitted_at = submitted_at
        self.first_step_at: float | None = None
        self.cancel_requested = False
        self.embeddings: Any = None  # device (embeds, pooled) while images still wait to be admitted
        self.images_admitted = 0
        self.images_done = 0
        self.steps_done = [0] * request.num_images
        # [first, end) of the guided steps: two UNet rows each, one row for the others (guidance_rows.py).
        self.guided = guided_steps(request.guidance_scale, request.guidance_interval, request.steps)
        self.adapters = NO_ADAPTERS  # its LoRA adapters, set by the engine once checked
        self._on_terminal = on_terminal
        self._lock = threading.Lock()
        self._count_lock = threading.Lock()
        self._terminal = False

    @property
    def total_steps(self) -> int:
        return self.request.steps * self.request.num_images

    @property
    def terminal(self) -> bool:
        return self._terminal

    def deliver(self, event: EngineEvent) -> bool:
        """Calls the listener unless a terminal event was already delivered; True if delivered."""
        with self._lock:
            if self._terminal:
                return False
            if isinstance(event, Finished | Failed):
                self._terminal = True
                self.embeddings = None
            try:
                self.listener(event)
            except Exception:  # a broken listener must not take the engine down
                log.exception("listener of request %s raised", self.request_id)
        if self._terminal and self._on_terminal is not None:
            self._on_terminal(self)
        return True

    def image_finished(self) -> bool:
        """Counts one delivered image (workers run concurrently); True when it was the last one."""
        with self._count_lock:
            self.images_done += 1
            return self.images_done == self.request.num_images


@dataclasses.dataclass(eq=False)
class WorkItem:
    """One image of a request: what occupies a slot."""

    request: TrackedRequest
    index: int

    @property
    def seed(self) -> int:
        return self.request.request.seed + self.index

    @property
    def steps(self) -> int:
        return self.request.request.steps

    def rows_at(self, step: int) -> int:
        """UNet rows this image takes at its step `step` (0 past its end)."""
        return rows_at(self.request.guided, self.steps, step)

    def row_steps(self, start: int = 0) -> int:
        """UNet rows summed over its steps from `start` on: the work it still brings to the rows."""
        return row_steps(self.request.guided, self.steps, start)
