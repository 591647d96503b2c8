"""One request of the group, run as parts on several engines, with the parts' events merged into the
one stream the caller's listener expects (api.py: Queued, then Progress and ImageReady, then exactly
one of Finished / Failed).

A part is the request's images ``[first, first + count)`` on one engine, submitted as a request of
``count`` images with seed ``seed + first``: the engine draws image ``i`` of a request with seed
``seed + i``, so each image is the one the whole request would have drawn, and its index is shifted
back here. Until every part is admitted (``open``), events are held: if a later part is refused, the
admitted ones are cancelled and the caller gets the refusal alone, as from one engine.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from typing import Any

from sdxl_server.engine.api import (
    EngineEvent,
    Failed,
    Finished,
    ImageReady,
    Listener,
    Progress,
    Queued,
)


@dataclasses.dataclass
class Part:
    engine: int  # its engine's index in the group
    first: int  # the request's index of its first image
    count: int
    total_steps: int  # its steps summed over its images (Progress.total_steps)
    row_steps: int  # its UNet row-steps, the work the ledger counts
    ticket: Any = None  # the engine's ticket, once submitted
    completed_steps: int = 0
    finished: Finished | None = None
    queued: Queued | None = None


class SplitRequest:
    """The group's ticket for one request: its parts and the merge of their events.

    `on_work_done(engine, row_steps)` reports work that left a part (progress, or what an ended part
    had left), so the group's ledger follows the engines."""

    def __init__(
        self,
        request_id: str,
        listener: Listener,
        parts: list[Part],
        on_work_done: Callable[[int, float], None],
        cancel_part: Callable[[Part], None],
    ) -> None:
        self.request_id = request_id
        self.parts = parts
        self._listener = listener
        self._on_work_done = on_work_done
        self._cancel_part = cancel_part
        self._lock = threading.Lock()  # one event at a time reaches the listener, none after the terminal
        self._opened = False
        self._held: list[EngineEvent] = []  # events before open()
        self._terminal = False
        self._dropped = False  # refused at submit: nothing reaches the caller

    # ---- the group's calls

    def listener_of(self, part: Part) -> Listener:
        return lambda event: self._on_event(part, event)

    def open(self) -> None:
        """Every part is admitted: the merged Queued, then what the parts did meanwhile."""
        with self._lock:
            self._opened = True
            queued = [p.queued for p in self.parts if p.queued is not None]
            held, self._held = self._held, []
            if queued:
                self._send(
                    Queued(
                        position=min(q.position for q in queued),
                        prompt_truncated=any(q.prompt_truncated for q in queued),
                        unknown_words=queued[0].unknown_words,
                    )
                )
            for event in held:
                self._send(event)

    def drop(self) -> None:
        """A part was refused at submit: cancel the admitted ones; the caller hears nothing from them."""
        with self._lock:
            self._dropped = True
        for part in self.parts:
            if part.ticket is not None:
                self._cancel_part(part)

    def cancel(self) -> None:
        for part in self.parts:
            if part.ticket is not None:
                self._cancel_part(part)

    @property
    def terminal(self) -> bool:
        return self._terminal

    # ---- the engines' threads

    def _on_event(self, part: Part, event: EngineEvent) -> None:
        if isinstance(event, Progress):
            self._progressed(part, event)
        elif isinstance(event, Finished | Failed):
            self._ended(part)
        merged: EngineEvent | None
        cancel_others = False
        with self._lock:
            if isinstance(event, Queued):
                part.queued = event
                return
            merged = self._merge(part, event)
            if merged is None or self._terminal or self._dropped:
                return
            if isinstance(merged, Failed):
                cancel_others = True
            self._deliver(merged)
        if cancel_others:  # outside the lock: an engine may deliver the others' Failed synchronously
            for other in self.parts:
                if other is not part and other.finished is None:
                    self._cancel_part(other)

    def _merge(self, part: Part, event: EngineEvent) -> EngineEvent | None:
        if isinstance(event, Progress):
            part.completed_steps = event.completed_steps
            return Progress(
                completed_steps=sum(p.completed_steps for p in self.parts),
                total_steps=sum(p.total_steps for p in self.parts),
            )
        if isinstance(event, ImageReady):
            return dataclasses.replace(event, index=part.first + event.index)
        if isinstance(event, Finished):
            part.finished = event
            if any(p.finished is None for p in self.parts):
                return None
            return merge_finished([p.finished for p in self.parts if p.finished is not None])
        return event  # Failed: the first one ends the request

    def _deliver(self, event: EngineEvent) -> None:
        if isinstance(event, Finished | Failed):
            self._terminal = True
        if self._opened:
            self._send(event)
        else:
            self._held.append(event)

    def _send(self, event: EngineEvent) -> None:
        if not self._dropped:
            self._listener(event)

    def _progressed(self, part: Part, event: Progress) -> None:
        done_before = part.row_steps * part.completed_steps / max(part.total_steps, 1)
        done_now = part.row_steps * event.completed_steps / max(part.total_steps, 1)
        self._on_work_done(part.engine, done_now - done_before)

    def _ended(self, part: Part) -> None:
        done = part.row_steps * part.completed_steps / max(part.total_steps, 1)
        self._on_work_done(part.engine, part.row_steps - done)


def merge_finished(parts: list[Finished]) -> Finished:
    """One Finished for the whole request: its queue time until its first image entered a slot, its
    denoising until the last one was denoised; the device and host work of its phases summed over the
    parts (they ran on different devices at once, so a sum is the work, not the wall time)."""
    queue = min(p.queue_seconds for p in parts)
    denoised = max(p.queue_seconds + p.denoise_seconds for p in parts)
    return Finished(
        queue_seconds=queue,
        denoise_seconds=denoised - queue,
        total_seconds=max(p.total_seconds for p in parts),
        tokenize_seconds=max(p.tokenize_seconds for p in parts),  # each engine tokenizes (a cache hit after)
        text_encode_seconds=sum(p.text_encode_seconds for p in parts),
        decode_seconds=sum(p.decode_seconds for p in parts),
        to_host_seconds=sum(p.to_host_seconds for p in parts),
        image_encode_seconds=sum(p.image_encode_seconds for p in parts),
    )
