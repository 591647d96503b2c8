"""Image encoding (PNG, JPEG, WebP) and the worker pool that runs it off the step loop.

A worker pulls a decoded uint8 batch to the host (which waits for the device there, not in the step
loop), then encodes and delivers each finished image of it.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image

from sdxl_server.engine.api import ImageFormat

_PIL_FORMATS = {ImageFormat.PNG: "PNG", ImageFormat.JPEG: "JPEG", ImageFormat.WEBP: "WEBP"}


def encode_image(pixels: np.ndarray, image_format: ImageFormat, quality: int = 90) -> bytes:
    """Encodes uint8[height, width, 3] pixels; quality applies to JPEG and WebP (1-100)."""
    buffer = io.BytesIO()
    image = Image.fromarray(np.ascontiguousarray(pixels), mode="RGB")
    if image_format is ImageFormat.PNG:
        # Level 1: PNG stays lossless; higher levels cost several times the CPU for a few % of bytes.
        image.save(buffer, format="PNG", compress_level=1)
    else:
        image.save(buffer, format=_PIL_FORMATS[image_format], quality=int(quality))
    return buffer.getvalue()


class ImageWorkers:
    """Runs `fetch_and_deliver(device_batch, ...)` jobs on a small thread pool, at most `max_pending` at a
    time: `submit` blocks when that many are waiting or running (backpressure on the step loop instead of
    an unbounded backlog of decoded images in memory).

    `on_error` is called with any exception (a failed device-to-host copy means the device is broken).
    """

    def __init__(self, workers: int, on_error: Callable[[BaseException], None], max_pending: int = 0) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sdxl-images")
        self._on_error = on_error
        self._room = threading.BoundedSemaphore(max_pending or 4 * workers)

    def submit(self, job: Callable[..., None], *args: Any) -> float:
        """Queues `job(*args)`; returns the seconds spent waiting for room."""
        began = time.perf_counter()
        self._room.acquire()
        waited = time.perf_counter() - began
        try:
            future = self._pool.submit(job, *args)
        except BaseException:
            self._room.release()
            raise
        future.add_done_callback(self._finished)
        return waited

    def _finished(self, future: Any) -> None:
        self._room.release()
        error = None if future.cancelled() else future.exception()
        if error is not None:
            self._on_error(error)

    def shutdown(self, wait: bool = True) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=not wait)
