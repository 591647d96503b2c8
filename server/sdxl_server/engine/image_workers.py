"""Image encoding (PNG, JPEG, WebP) and the worker pool that delivers decoded images off the step loop.

A worker pulls a decoded uint8 batch to the host (which waits for the device there, not in the step
loop), then encodes each finished image of it and delivers it (ImageReady, then Finished after a
request's last image).

Ownership: the step loop only calls `submit`; everything else here runs on the workers' threads, and
touches only the requests of the batch (whose deliveries are serialised per request, tracked_request.py)
and the stats board's image counter.
"""

from __future__ import annotations

import dataclasses
import io
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image

from sdxl_server.engine.api import Finished, ImageFormat, ImageReady, Resolution
from sdxl_server.engine.batching.tracked_request import WorkItem
from sdxl_server.engine.stats import StatsBoard

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


@dataclasses.dataclass(frozen=True)
class DecodedBatch:
    """A dispatched decode: what a worker copies to the host and delivers."""

    pixels: Any  # the decode program's uint8[devices * bucket, height, width, 3], one block per device
    bucket: int  # rows per device block
    images: list[tuple[int, int, WorkItem]]  # (device, row in its block, image) of every real image
    resolution: Resolution


class ImageWorkers:
    """Delivers `DecodedBatch`es on a small thread pool, at most `max_pending` at a time: `submit` blocks
    when that many are waiting or running (backpressure on the step loop instead of an unbounded backlog
    of decoded images in memory).

    `on_error` is called with any exception (a failed device-to-host copy means the device is broken);
    `clock` is the engine's clock, which Finished's durations are measured in.
    """

    def __init__(
        self,
        workers: int,
        on_error: Callable[[BaseException], None],
        max_pending: int = 0,
        *,
        stats: StatsBoard,
        clock: Callable[[], float],
    ) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sdxl-images")
        self._on_error = on_error
        self._room = threading.BoundedSemaphore(max_pending or 4 * workers)
        self._stats = stats
        self._clock = clock

    def submit(self, batch: DecodedBatch) -> float:
        """Queues the delivery of `batch` (the step loop's thread); returns the seconds spent waiting for
        room."""
        began = time.perf_counter()
        self._room.acquire()
        waited = time.perf_counter() - began
        try:
            future = self._pool.submit(self._deliver, batch)
        except BaseException:
            self._room.release()
            raise
        future.add_done_callback(self._finished)
        return waited

    def _deliver(self, batch: DecodedBatch) -> None:
        # Only the rows that hold real images cross to the host (each device's block holds `bucket`).
        bucket = batch.bucket
        by_block = {
            (shard.index[0].start or 0) // bucket: shard.data for shard in batch.pixels.addressable_shards
        }
        needed: dict[int, int] = {}
        for device, row, _ in batch.images:
            needed[device] = max(needed.get(device, 0), row + 1)
        pixels = {  # waits for the device here, off the step loop
            device: np.asarray(by_block[device] if rows == bucket else by_block[device][:rows])
            for device, rows in needed.items()
        }
        resolution = batch.resolution
        for device, row, item in batch.images:
            request = item.request
            if request.terminal:
                continue
            req = request.request
            data = encode_image(pixels[device][row], req.image_format, req.quality)
            request.deliver(
                ImageReady(item.index, item.seed, data, req.image_format, resolution.width, resolution.height)
            )
            self._stats.count_image()  # before Finished: a caller that reads stats then sees its images
            if request.image_finished():
                now = self._clock()
                first = request.first_step_at if request.first_step_at is not None else now
                request.deliver(
                    Finished(
                        queue_seconds=first - request.submitted_at,
                        denoise_seconds=now - first,
                        total_seconds=now - request.submitted_at,
                    )
                )

    def _finished(self, future: Any) -> None:
        self._room.release()
        error = None if future.cancelled() else future.exception()
        if error is not None:
            self._on_error(error)

    def shutdown(self, wait: bool = True) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=not wait)
