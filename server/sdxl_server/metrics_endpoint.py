"""The HTTP endpoint that serves ``GET /metrics`` from a registry (the metrics themselves: metrics.py)."""

from __future__ import annotations

import asyncio
import contextlib

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder


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
