"""The /metrics endpoint holds up against idle and half-open connections without a thread for each."""

from __future__ import annotations

import contextlib
import select
import socket
import time
import urllib.request
from pathlib import Path

IDLE_CONNECTIONS = 100
MAX_CONNECTIONS = 32  # MetricsServer.MAX_CONNECTIONS


def _threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads line")


def _closed_by_peer(sockets: list[socket.socket], enough: int, timeout: float) -> int:
    """How many of ``sockets`` the server closed (EOF or reset), once ``enough`` are or at ``timeout``."""
    open_ones, closed = list(sockets), 0
    deadline = time.monotonic() + timeout
    while open_ones and closed < enough and time.monotonic() < deadline:
        readable, _, _ = select.select(open_ones, [], [], max(deadline - time.monotonic(), 0))
        for s in readable:
            open_ones.remove(s)
            try:
                closed += s.recv(1) == b""
            except ConnectionError:
                closed += 1
    return closed


def test_idle_connections_cost_no_threads_and_cannot_lock_out_a_scrape(hostile_server) -> None:
    pid = hostile_server.process.pid
    hostile_server.scrape_metrics()
    threads_before = _threads(pid)
    idle = []
    try:
        for _ in range(IDLE_CONNECTIONS):
            idle.append(socket.create_connection(("127.0.0.1", hostile_server.metrics_port), timeout=10))
        # Half-open: a request line but never the blank line that ends the head.
        for s in idle[::2]:
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        page = hostile_server.scrape_metrics()  # served although 100 connections are hanging
        assert "sdxl_requests_total" in page
        assert _threads(pid) <= threads_before + 2  # the old server started one thread per connection
        # The oldest idle connections were closed to make room: at most MAX_CONNECTIONS stay open.
        enough = IDLE_CONNECTIONS + 1 - MAX_CONNECTIONS
        assert _closed_by_peer(idle, enough, timeout=30.0) >= enough
    finally:
        for s in idle:
            with contextlib.suppress(OSError):
                s.close()


def test_only_get_metrics_is_served(hostile_server) -> None:
    base = f"http://127.0.0.1:{hostile_server.metrics_port}"
    for path, method, status in (("/nope", "GET", 404), ("/metrics", "POST", 405)):
        request = urllib.request.Request(base + path, method=method, data=b"" if method == "POST" else None)
        try:
            urllib.request.urlopen(request, timeout=30)
        except urllib.error.HTTPError as e:
            assert e.code == status
        else:
            raise AssertionError(f"{method} {path} was served")
    with socket.create_connection(("127.0.0.1", hostile_server.metrics_port), timeout=30) as s:
        s.sendall(b"\x16\x03\x01 not http at all\r\n\r\n")
        assert s.recv(64).startswith(b"HTTP/1.1 400")
