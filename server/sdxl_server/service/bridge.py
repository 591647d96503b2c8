"""The bridge between the engine's thread and the gRPC event loop, for one request.

The engine calls a listener from its own thread and must never block, so the listener only hands each
event to the event loop (``loop.call_soon_threadsafe``) where the RPC handler reads them in order from an
unbounded queue (bounded in practice: one request produces at most 1 + steps x images + images + 1 events).
A door that shows no progress (unary Generate, the OpenAI door) asks for none: its Progress events are
dropped on the engine's thread instead of waking the event loop once per step for nothing.

Cancellation goes the other way: when the RPC ends early (the client cancelled, disconnected or its
deadline passed, or the handler failed), ``cancel()`` tells the engine, which frees the request's slots at
the next step boundary. It is wired both to the RPC's done callback and to the handler's ``finally``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from sdxl_server.engine.api import (
    Engine,
    EngineEvent,
    Failed,
    Finished,
    GenerationRequest,
    Progress,
    Ticket,
)

log = logging.getLogger(__name__)


class EngineCall:
    def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop, progress: bool = True) -> None:
        self._engine = engine
        self._loop = loop
        self._progress = progress
        self._events: asyncio.Queue[EngineEvent] = asyncio.Queue()
        self._ticket: Ticket | None = None
        self._ended = False  # the engine delivered Finished or Failed, or we cancelled

    def submit(self, request: GenerationRequest) -> None:
        """Admits the request into the engine; raises the engine's admission errors at once."""
        self._ticket = self._engine.submit(request, self._on_event)

    def _on_event(self, event: EngineEvent) -> None:  # engine thread
        if not self._progress and isinstance(event, Progress):
            return
        # A closed loop (RuntimeError) means the process is exiting and nobody is listening.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)

    async def events(self) -> AsyncIterator[EngineEvent]:
        """The request's events in order, ending with (and including) Finished or Failed."""
        while True:
            event = await self._events.get()
            if isinstance(event, Finished | Failed):
                self._ended = True
            yield event
            if self._ended:
                return

    def cancel(self) -> None:
        """Frees the request's slots unless it already ended. Idempotent, never raises."""
        if self._ended or self._ticket is None:
            return
        self._ended = True
        try:
            self._engine.cancel(self._ticket)
        except Exception:
            log.exception("cancelling request %s failed", self._ticket.request_id)
