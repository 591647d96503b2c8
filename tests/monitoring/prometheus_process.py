"""A real Prometheus (Debian's, from `make debian-tools`) for tests, and a kube-state-metrics stand-in.

Prometheus cannot bind port 0 and report the port, so a free port is picked just before it starts
(another process taking it in between fails the start loudly). Readiness is Prometheus' own
``/-/ready``; queries go through the HTTP API.

kube-state-metrics needs a Kubernetes API server, which cannot run here: ``StaticExporter`` serves fixed
kube-state-metrics series (the HPA's) over HTTP instead, so that the dashboard's HPA queries have a real
scrape to read. It is a stand-in, and the only one in these tests.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

START_TIMEOUT_SECONDS = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Prometheus:
    def __init__(self, binary: str, work_dir: pathlib.Path, config: dict[str, Any]) -> None:
        self.work_dir = work_dir
        self.port = free_port()
        config_file = work_dir / "prometheus.yml"
        config_file.write_text(json.dumps(config))  # JSON is YAML
        self._log = open(work_dir / "prometheus.log", "wb")  # noqa: SIM115 - lives as long as the process
        self.process = subprocess.Popen(
            [
                binary,
                f"--config.file={config_file}",
                f"--storage.tsdb.path={work_dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.process.returncode}:\n{self.log()}")
            with contextlib.suppress(OSError):
                self._get("/-/ready")
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"prometheus not ready after {START_TIMEOUT_SECONDS}s:\n{self.log()}")
            time.sleep(0.1)

    def log(self) -> str:
        return (self.work_dir / "prometheus.log").read_text(errors="replace")

    def api(self, path: str, **params: str) -> Any:
        """``/api/v1/<path>``'s ``data``; raises on an error status (a bad query, say)."""
        query = "?" + urllib.parse.urlencode(params) if params else ""
        body = json.loads(self._get(f"/api/v1/{path}{query}"))
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus {path} failed: {body}")
        return body["data"]

    def query(self, promql: str) -> list[tuple[dict[str, str], float]]:
        """An instant query's samples: ``[(labels, value), ...]``."""
        data = self.api("query", query=promql)
        if data["resultType"] == "scalar":
            return [({}, float(data["result"][1]))]
        return [(r["metric"], float(r["value"][1])) for r in data["result"]]

    def _get(self, path: str) -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=10) as response:
            body: bytes = response.read()
            return body

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


@contextlib.contextmanager
def static_exporter(text: str) -> Iterator[int]:
    """Serves ``text`` as a /metrics page on a free port (yields the port) until the block ends."""
    page = text.encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args: Any) -> None:  # keep the test output clean
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, name="static-exporter", daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
