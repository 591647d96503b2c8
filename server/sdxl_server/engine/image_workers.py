"""Image encoding (PNG, JPEG, WebP) and the worker pool that delivers decoded images off the step loop.

A worker waits for a decoded uint8 batch (there, not in the step loop), pulls the real images' rows to
the host, then encodes each finished image of it and delivers it (ImageReady, then Finished after a
request's last image, with the request's time budget). PNG goes through png_writer.py, whose compression
releases the GIL, so the workers encode in parallel with each other and with the step loop; the encoded
bytes are the ones the service hands to protobuf (one copy from the pixels to the response).

Ownership: the step loop only calls `submit`; everything else here runs on the workers' threads, and
touches only the requests of the batch (whose deliveries are serialised per request, tracked_request.py)
and the stats board's image counter.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image

from sdxl_server.engine.api import Finished, ImageFormat, ImageReady, Resolution
from sdxl_server.engine.batching.tracked_request import TrackedRequest, WorkItem
from sdxl_server.engine.png_writer import encode_png
from sdxl_server.engine.stats import StatsBoard

_PIL_FORMATS = {ImageFormat.PNG: "PNG", ImageFormat.JPEG: "JPEG", ImageFormat.WEBP: "WEBP"}


def encode_image(
    pixels: np.ndarray, image_format: ImageFormat, quality: int = 90, png_compression: int = 1
) -> bytes:
    """Encodes uint8[height, width, 3] pixels; quality applies to JPEG and WebP (1-100), png_compression
    (zlib's level, 0-9) to PNG, which stays lossless whatever the level."""
    if image_format is ImageFormat.PNG:
        return encode_png(pixels, png_compression)
    buffer = io.BytesIO()
    image = Image.fromarray(np.ascontiguousarray(pixels), mode="RGB")
    image.save(buffer, format=_PIL_FORMATS[image_format], quality=int(quality))
    return buffer.getvalue()


@dataclasses.dataclass(frozen=True)
class DecodedBatch:
    """A dispatched decode: what a worker copies to the host and delivers."""

    pixels: Any  # the decode program's uint8[devices * bucket, height, width, 3], one block per device
    bucket: int  # rows per device block
    images: list[tuple[int, int, WorkItem]]  # (device, row in its block, image) of every real image
    resolution: Resolution
    # The decode's device seconds, set by the device clock once it completed (None: not measured).
    device_seconds: Future[float] | None = None


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
        png_compression: int = 1,
    ) -> None:
        self._png_compression = png_compression
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
        for device in needed:  # waits for the device here, off the step loop
            by_block[device].block_until_ready()
        copy_began = time.perf_counter()
        pixels = {
            device: np.asarray(by_block[device] if rows == bucket else by_block[device][:rows])
            for device, rows in needed.items()
        }
        to_host = (time.perf_counter() - copy_began) / max(1, len(batch.images))  # each image's share
        decode_seconds = _measured(batch.device_seconds)
        in_batch: set[TrackedRequest] = set()
        resolution = batch.resolution
        for device, row, item in batch.images:
            request = item.request
            if request.terminal:
                continue
            budget = request.budget
            if request not in in_batch:  # the batch's device time counts once per request in it
                in_batch.add(request)
                budget.add("decode_seconds", decode_seconds)
            budget.add("to_host_seconds", to_host)
            req = request.request
            encode_began = time.perf_counter()
            data = encode_image(pixels[device][row], req.image_format, req.quality, self._png_compression)
            budget.add("image_encode_seconds", time.perf_counter() - encode_began)
            request.deliver(
                ImageReady(item.index, item.seed, data, req.image_format, resolution.width, resolution.height)
            )
            self._stats.count_image()  # before Finished: a caller that reads stats then sees its images
            if request.image_finished():
                request.deliver(_finished(request, self._clock()))

    def _finished(self, future: Any) -> None:
        self._room.release()
        error = None if future.cancelled() else future.exception()
        if error is not None:
            self._on_error(error)

    def shutdown(self, wait: bool = True) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=not wait)


def _finished(request: TrackedRequest, now: float) -> Finished:
    """The request's last event, with its time budget (request_budget.py)."""
    first = request.first_step_at if request.first_step_at is not None else now
    budget = request.budget
    denoised = budget.denoised_at if budget.denoised_at is not None else now
    return Finished(
        queue_seconds=first - request.submitted_at,
        denoise_seconds=max(0.0, denoised - first),
        total_seconds=now - request.submitted_at,
        tokenize_seconds=budget.tokenize_seconds,
        text_encode_seconds=budget.text_encode_seconds,
        decode_seconds=budget.decode_seconds,
        to_host_seconds=budget.to_host_seconds,
        image_encode_seconds=budget.image_encode_seconds,
    )


def _measured(device_seconds: Future[float] | None) -> float:
    """The decode's device seconds; the device clock records a completed dispatch at once (it watches
    them in order, and everything before this one completed too), so this waits microseconds."""
    if device_seconds is None:
        return 0.0
    try:
        return device_seconds.result(timeout=5.0)
    except concurrent.futures.TimeoutError:
        return 0.0
