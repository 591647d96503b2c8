"""Real ``sdxl-server serve`` processes on 127.0.0.1, for tests and benchmarks alike.

A server started with ``--port 0 --metrics-port 0`` (and ``--http-port 0``) binds free ports and logs one
JSON line with ``"event": "listening"``, ``"port"``, ``"metrics_port"`` and ``"http_port"`` (null when
HTTP is off). ``RunningServer`` is the one reader of that line: it captures the process's output line by
line, takes the ports from it, and observes readiness through the gRPC health service's Watch stream (no
sleeps, no polling loops). ``started_servers`` kills every process it started on exit, even when a test
fails half-way.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

DEFAULT_ARGS = (
    "--model", "tiny",
    "--host", "127.0.0.1",
    "--port", "0",
    "--metrics-port", "0",
    "--resolutions", "64x64,128x64",
    "--max-steps", "20",
    "--default-steps", "4",
)  # fmt: skip
# Starting Python, JAX and the gRPC server takes seconds; warm-up compiles (or loads from the shared
# compilation cache) every program, which the first server of a fresh machine does for real.
LISTEN_TIMEOUT_SECONDS = 120.0
READY_TIMEOUT_SECONDS = 600.0
SERVER_COMMAND = (sys.executable, "-m", "sdxl_server.main", "serve")


class ServerExited(RuntimeError):
    pass


class RunningServer:
    """One ``sdxl-server serve`` process; its stdout and stderr are captured line by line.

    ``args`` follow ``command`` (``sdxl-server serve`` by default); ``env`` is added to this process's
    environment, or replaces it when ``inherit_env`` is false (as a pod's environment would).
    """

    def __init__(
        self,
        args: Sequence[str],
        env: Mapping[str, str] | None = None,
        *,
        command: Sequence[str] = SERVER_COMMAND,
        inherit_env: bool = True,
    ) -> None:
        self.args = list(args)
        self.root_certificates = _root_certificates(self.args)
        base = dict(os.environ) if inherit_env else {}
        full_env = {**base, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.process = subprocess.Popen(
            [*command, *self.args],
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        self._lines: list[str] = []
        self._lock = threading.Condition()
        self._listening = threading.Event()
        self.port = 0
        self.metrics_port = 0
        self.http_port: int | None = None
        self._reader = threading.Thread(
            target=self._read_output, name=f"server-{self.process.pid}", daemon=True
        )
        self._reader.start()
        if not self._listening.wait(LISTEN_TIMEOUT_SECONDS) or not self.port:
            self.kill()
            raise ServerExited(f"server did not report listening:\n{self.output()}")

    def _read_output(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._lock:
                self._lines.append(line.rstrip("\n"))
                self._lock.notify_all()
            if not self._listening.is_set():
                self._take_ports(line)
        self._listening.set()  # the process ended: wake anyone waiting (port stays 0)

    def _take_ports(self, line: str) -> None:
        """Reads the ports from the listening line (the only place that parses it)."""
        if '"listening"' not in line:
            return
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, dict) and entry.get("event") == "listening":
                self.port = int(entry["port"])
                self.metrics_port = int(entry["metrics_port"])
                http_port = entry.get("http_port")
                self.http_port = int(http_port) if http_port is not None else None
                self._listening.set()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def output(self) -> str:
        with self._lock:
            return "\n".join(self._lines)

    def log_entries(self) -> list[dict[str, object]]:
        """The JSON log lines printed so far (other lines are skipped)."""
        with self._lock:
            return self._entries_locked()

    def wait_for_log_entry(
        self, matches: Callable[[dict[str, object]], bool], timeout: float = 60.0
    ) -> dict[str, object]:
        """The first JSON log entry for which ``matches`` is true, waiting for it to be printed."""
        with self._lock:
            found: list[dict[str, object]] = []

            def seen() -> bool:
                found[:] = [entry for entry in self._entries_locked() if matches(entry)][:1]
                return bool(found)

            if not self._lock.wait_for(seen, timeout):
                raise AssertionError(f"no matching log entry within {timeout}s:\n{chr(10).join(self._lines)}")
            return found[0]

    def _entries_locked(self) -> list[dict[str, object]]:
        entries = []
        for line in self._lines:
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict):
                    entries.append(entry)
        return entries

    def channel(self, options: Sequence[tuple[str, object]] = ()) -> grpc.Channel:
        """A channel to this server: TLS (trusting its certificate) when it serves TLS."""
        if self.root_certificates is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates=self.root_certificates)
            return grpc.secure_channel(self.target, credentials, options=list(options))
        return grpc.insecure_channel(self.target, options=list(options))

    def health_statuses(self, service: str = "", timeout: float = READY_TIMEOUT_SECONDS) -> Iterator[int]:
        """Streams the server's health status (grpc.health.v1 Watch): the current one, then each change."""
        with self.channel() as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for response in stub.Watch(health_pb2.HealthCheckRequest(service=service), timeout=timeout):
                yield response.status

    def wait_ready(self, timeout: float = READY_TIMEOUT_SECONDS, service: str = "") -> None:
        """Returns once the health service reports SERVING for ``service`` ("" is the whole server)."""
        statuses = self.health_statuses(service, timeout)
        try:
            for status in statuses:
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
        except grpc.RpcError as e:
            raise ServerExited(f"server did not become ready ({e.code().name}):\n{self.output()}") from None
        finally:
            statuses.close()  # ends the Watch call and closes its channel
        raise ServerExited(f"health stream ended before SERVING:\n{self.output()}")

    def scrape_metrics(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=30) as response:
            return str(response.read().decode())

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM, then waits for the exit; returns the exit code (kills and raises on timeout)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout)
            self._reader.join(30)  # every line the process printed is in output() once this returns
            return code
        except subprocess.TimeoutExpired:
            self.kill()
            raise ServerExited(
                f"server did not exit within {timeout}s of SIGTERM:\n{self.output()}"
            ) from None

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


def _root_certificates(args: Sequence[str]) -> bytes | None:
    """The server's own certificate when it serves TLS (tests use self-signed certificates)."""
    for i, arg in enumerate(args):
        if arg == "--tls-cert-file" and i + 1 < len(args):
            return Path(args[i + 1]).read_bytes()
        if arg.startswith("--tls-cert-file="):
            return Path(arg.split("=", 1)[1]).read_bytes()
    return None


StartServer = Callable[..., RunningServer]


@contextlib.contextmanager
def started_servers(*always: str) -> Iterator[StartServer]:
    """``start(*extra_args, env=None, wait_ready=True, command=SERVER_COMMAND)``: DEFAULT_ARGS + ``always``
    + ``extra_args`` (later flags override earlier ones); every server started is killed on exit."""
    started: list[RunningServer] = []

    def start(
        *extra_args: str,
        env: dict[str, str] | None = None,
        wait_ready: bool = True,
        command: Sequence[str] = SERVER_COMMAND,
    ) -> RunningServer:
        server = RunningServer([*DEFAULT_ARGS, *always, *extra_args], env, command=command)
        started.append(server)
        if wait_ready:
            server.wait_ready()
        return server

    try:
        yield start
    finally:
        for server in started:
            server.kill()
