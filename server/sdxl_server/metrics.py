"""Prometheus metrics with exactly the names of docs/ARCHITECTURE.md ("Ports and metrics").

Two sources: the service observes what it sees per RPC (``sdxl_requests_total``,
``sdxl_request_duration_seconds``, ``sdxl_queue_wait_seconds``); everything about the engine's state is
read lazily from ``engine.stats()`` at scrape time by a custom collector, so the step loop never touches a
metrics object and the gauges can never go stale. ``sdxl_load`` is the autoscaling signal.
Everything lives in one registry per server (not the process-global default), so tests can run several.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from sdxl_server.engine.api import EngineStats

# Seconds. A 64x64 tiny-model request takes tens of ms; a queued 1024x1024 SDXL request can take minutes.
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ServiceMetrics:
    """What the gRPC service records per request."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "sdxl_requests_total",
            "Finished RPCs by method and gRPC status code.",
            ["method", "code"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "sdxl_request_duration_seconds",
            "Server-side latency of a request, from arrival to its status.",
            ["method"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_wait = Histogram(
            "sdxl_queue_wait_seconds",
            "Time from admission until the request's first image entered a slot.",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )

    def observe_request(self, method: str, code: str, seconds: float) -> None:
        self.requests.labels(method=method, code=code).inc()
        self.request_duration.labels(method=method).observe(seconds)


StepHistogram = Callable[[], tuple[list[tuple[float, int]], float] | None]


class EngineCollector(Collector):
    """Reads ``engine.stats()`` at scrape time and reports it under the contract's names.

    ``step_histogram``, when given, returns the engine's step-duration histogram as cumulative
    ``[(upper_bound, count), ...]`` (ending with +Inf) and the sum of observed seconds.
    """

    def __init__(
        self,
        stats: Callable[[], EngineStats],
        step_histogram: StepHistogram | None = None,
        serving: Callable[[], bool] | None = None,
    ) -> None:
        """``serving``, when given, says whether the service takes new requests (False while draining)."""
        self._stats = stats
        self._step_histogram = step_histogram
        self._serving = serving

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily | HistogramMetricFamily]:
        s = self._stats()
        ready = s.ready and (self._serving is None or self._serving())
        gauges = (
            ("sdxl_queue_depth", "Images admitted and waiting for a slot.", s.queue_depth),
            ("sdxl_slots_busy", "Slots holding an image being denoised.", s.slots_busy),
            ("sdxl_slots_total", "Slots (images denoised concurrently).", s.slots_total),
            ("sdxl_load", "(images waiting + images in slots) / slots: the autoscaling signal.", s.load),
            (
                "sdxl_device_busy_ratio",
                "Share of recent wall time the device was computing.",
                s.device_busy_ratio,
            ),
            (
                "sdxl_compile_seconds",
                "Time spent compiling (or loading compiled) programs.",
                s.compile_seconds,
            ),
            ("sdxl_startup_seconds", "Process start until ready to serve.", s.startup_seconds),
            (
                "sdxl_ready",
                "1 once warm-up finished and the server takes requests; 0 again while it drains.",
                1.0 if ready else 0.0,
            ),
        )
        for name, documentation, value in gauges:
            # A pod that does not serve (warming up, draining) reports no load at all rather than 0: for
            # a Pods metric the HPA counts a running pod's sample whatever its readiness, so a warming
            # pod's 0 pulled the average toward a scale-down; a missing sample counts as 0 on a scale-up
            # and as the target on a scale-down (docs/AUTOSCALING.md, "Findings").
            if name == "sdxl_load" and not ready:
                continue
            yield GaugeMetricFamily(name, documentation, value=float(value))
        yield CounterMetricFamily("sdxl_images_total", "Images generated.", value=float(s.images_total))
        yield CounterMetricFamily(
            "sdxl_steps_total", "Denoising steps run, per image.", value=float(s.steps_total)
        )
        histogram = self._step_histogram() if self._step_histogram else None
        if histogram is not None:
            buckets, total = histogram
            yield HistogramMetricFamily(
                "sdxl_step_duration_seconds",
                "Device time of one batched denoising step.",
                buckets=[(_bound(b), count) for b, count in buckets],
                sum_value=total,
            )


def _bound(upper: float) -> str:
    return "+Inf" if upper == float("inf") else repr(float(upper))


class MetricsServer:
    """``GET /metrics`` over HTTP/1.x, served from the asyncio event loop; port 0 picks a free port.

    Bounded by construction: a connection is a coroutine, not a thread; at most ``MAX_CONNECTIONS`` are
    open at once; each has ``REQUEST_TIMEOUT_SECONDS`` to send its request head (``MAX_HEAD_BYTES`` at
    most) and take the page, then it is closed. When a new connection would exceed the bound, the oldest
    one that has not yet sent its request is closed to make room (so idle or half-open connections
    cannot lock a scraper out), or, if every open one is being answered, the new one. One request per
    connection (``Connection: close``): a scraper reconnects every few seconds at most. The page is
    built on the loop: the collectors read lock-free snapshots, which takes well under a millisecond.
    (Hand-written rather than aiohttp's server, which has no bound on open connections or on the time
    to send a request head.)
    """

    MAX_CONNECTIONS = 32
    REQUEST_TIMEOUT_SECONDS = 10.0  # Prometheus' default scrape timeout
    MAX_HEAD_BYTES = 16 * 1024

    def __init__(self, registry: CollectorRegistry, server: asyncio.Server) -> None:
        self._registry = registry
        self._server = server
        # Open connections, oldest first: True once the request head arrived and it is being answered.
        self._connections: dict[asyncio.StreamWriter, bool] = {}

    @classmethod
    async def start(cls, registry: CollectorRegistry, host: str, port: int) -> MetricsServer:
        """Listens on ``host:port``."""
        holder: list[MetricsServer] = []

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await holder[0]._serve(reader, writer)

        server = await asyncio.start_server(handle, host, port, limit=cls.MAX_HEAD_BYTES)
        metrics_server = cls(registry, server)
        holder.append(metrics_server)
        return metrics_server

    @property
    def port(self) -> int:
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    async def stop(self) -> None:
        self._server.close()
        for writer in list(self._connections):
            writer.transport.abort()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._server.wait_closed(), 1.0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._connections) >= self.MAX_CONNECTIONS and not self._evict_one_waiting():
            writer.transport.abort()
            return
        self._connections[writer] = False
        try:
            async with asyncio.timeout(self.REQUEST_TIMEOUT_SECONDS):
                head = await reader.readuntil(b"\r\n\r\n")
                self._connections[writer] = True
                writer.write(self._response(head))
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass  # a client that went away, stalled or sent an oversized head gets nothing more
        finally:
            self._connections.pop(writer, None)
            # close() would wait for a peer that stopped reading to take the rest of the page.
            if writer.transport.get_write_buffer_size():
                writer.transport.abort()
            else:
                writer.close()

    def _evict_one_waiting(self) -> bool:
        """Closes the oldest connection still sending its request head; False if there is none."""
        for writer, answering in self._connections.items():
            if not answering:
                del self._connections[writer]
                writer.transport.abort()
                return True
        return False

    def _response(self, head: bytes) -> bytes:
        request_line, _, header_block = head.decode("latin-1").partition("\r\n")
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return _http(400, "text/plain; charset=utf-8", b"bad request\n")
        method, target = parts[0], parts[1]
        if target.split("?", 1)[0] != "/metrics":
            return _http(404, "text/plain; charset=utf-8", b"not found: try /metrics\n")
        if method not in ("GET", "HEAD"):
            return _http(405, "text/plain; charset=utf-8", b"only GET\n", extra="Allow: GET, HEAD\r\n")
        accept = ""
        for line in header_block.split("\r\n"):
            name, _, value = line.partition(":")
            if name.strip().lower() == "accept":
                accept = value.strip()
        encoder, content_type = choose_encoder(accept)
        body = encoder(self._registry)
        return _http(200, content_type, body, head_only=method == "HEAD")


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}


def _http(status: int, content_type: str, body: bytes, *, extra: str = "", head_only: bool = False) -> bytes:
    head = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n{extra}\r\n"
    )
    return head.encode("latin-1") + (b"" if head_only else body)
