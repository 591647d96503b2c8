"""What the `sdxl` command draws on stderr: a status line redrawn in place, and notes printed above it.

On a terminal the status line is rewritten with ``\\r`` and cleared before a note, so that a note (a retry,
a warning) never lands in the middle of a bar. Elsewhere (a pipe, a CI log) no line is drawn at all,
and notes are plain lines.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable
from typing import TextIO


def format_duration(seconds: float) -> str:
    """``0:07``, ``1:05``, ``1:02:03``: short and fixed-width enough for a status line."""
    whole = max(0, round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class StatusLine:
    """One line of status on ``stream`` (drawn only when ``enabled``), plus notes above it."""

    def __init__(self, stream: TextIO | None = None, *, enabled: bool | None = None) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self.enabled = self._stream.isatty() if enabled is None else enabled
        self._drawn = 0

    def show(self, text: str) -> None:
        if not self.enabled:
            return
        columns = shutil.get_terminal_size((100, 24)).columns - 1
        line = text[:columns]
        self._stream.write("\r" + line + " " * max(0, self._drawn - len(line)))
        self._stream.flush()
        self._drawn = len(line)

    def note(self, text: str) -> None:
        """Prints ``text`` on its own line; the status line is redrawn by the next :meth:`show`."""
        self.clear()
        print(text, file=self._stream, flush=True)

    def clear(self) -> None:
        if self._drawn:
            self._stream.write("\r" + " " * self._drawn + "\r")
            self._stream.flush()
            self._drawn = 0


def bar(fraction: float, width: int = 24) -> str:
    filled = round(width * min(1.0, max(0.0, fraction)))
    return "[" + "#" * filled + "." * (width - filled) + "]"


class StepProgress:
    """The generate bar: ``2 images x 30 steps [####....] 37/60  0:12 elapsed, ~0:07 left``.

    The remaining time is extrapolated from the steps done since denoising began (the wait in the
    queue is not denoising speed).
    """

    def __init__(self, line: StatusLine, clock: Callable[[], float] = time.monotonic) -> None:
        self._line = line
        self._clock = clock
        self._started = clock()
        self._first_step: tuple[float, int] | None = None

    def queued(self, ahead: int) -> None:
        waiting = f"{ahead} image{'s' if ahead != 1 else ''} ahead" if ahead else "starting"
        self._line.show(f"queued: {waiting}  {format_duration(self._clock() - self._started)} elapsed")

    def steps(self, completed: int, total: int, images: int) -> None:
        now = self._clock()
        if self._first_step is None:
            self._first_step = (now, completed)
        per_image = total // images if images and total % images == 0 else total
        what = f"{images} images x {per_image} steps" if images > 1 and per_image != total else "steps"
        left = ""
        began, done_then = self._first_step
        if completed > done_then and now > began:
            rate = (completed - done_then) / (now - began)
            left = f", ~{format_duration((total - completed) / rate)} left"
        fraction = completed / total if total else 0.0
        elapsed = format_duration(now - self._started)
        self._line.show(f"{what} {bar(fraction)} {completed}/{total}  {elapsed} elapsed{left}")
