"""Helpers for the HTTP front door's tests: curl as a subprocess, and server states built from events."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
from sdxl_client._proto.sdxl.v1 import sdxl_pb2, sdxl_pb2_grpc
from sdxl_test_support.metrics_page import metric_samples, sample
from sdxl_test_support.servers import RunningServer


def http_port(server: RunningServer) -> int:
    """The HTTP port the server reported in its listening line."""
    port = server.http_port
    assert port, f"the server serves no HTTP (--http-port not set):\n{server.output()}"
    return port


def base_url(server: RunningServer, scheme: str = "http") -> str:
    """What OpenAI(base_url=...) takes: the API root, /v1."""
    return f"{scheme}://127.0.0.1:{http_port(server)}/v1"


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """(certificate, key) for 127.0.0.1, made with the openssl CLI (the cryptography package is absent)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-nodes", "-days", "1",
            "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-keyout", str(key), "-out", str(cert),
            "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


# Thousands of steps: a request that holds its slot until the test cancels it.
LONG_STEPS = 5000


def curl(url: str, *args: str, body: Any = None) -> tuple[int, dict[str, str], Any]:
    """Runs ``curl`` against ``url``; returns (status, headers in lower case, the JSON body or None)."""
    executable = shutil.which("curl")
    assert executable, "curl is needed by these tests (Debian: apt-get install curl)"
    with tempfile.TemporaryDirectory() as tmp:
        headers_file, body_file = Path(tmp, "headers"), Path(tmp, "body")
        command = [executable, "-sS", "-D", str(headers_file), "-o", str(body_file), "-w", "%{http_code}"]
        if body is not None:
            command += ["-H", "Content-Type: application/json", "--data-binary", json.dumps(body)]
        done = subprocess.run([*command, *args, url], capture_output=True, text=True, timeout=120, check=True)
        headers = {}
        for line in headers_file.read_text().splitlines()[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        text = body_file.read_text() if body_file.exists() else ""
        return int(done.stdout), headers, json.loads(text) if text else None


@contextlib.contextmanager
def long_request(
    channel: grpc.Channel, metadata: Sequence[tuple[str, str]] = ()
) -> Iterator[Iterator[sdxl_pb2.GenerateEvent]]:
    """A gRPC stream known to hold a slot (its first progress event arrived); cancelled on exit."""
    stub = sdxl_pb2_grpc.ImageServiceStub(channel)
    stream = stub.GenerateStream(sdxl_pb2.GenerateRequest(prompt="long", steps=LONG_STEPS), metadata=metadata)
    try:
        assert next(stream).WhichOneof("event") == "queued"
        assert next(stream).WhichOneof("event") == "progress"
        yield stream
    finally:
        stream.cancel()


@contextlib.contextmanager
def queued_request(
    channel: grpc.Channel, metadata: Sequence[tuple[str, str]] = (), num_images: int = 1
) -> Iterator[Iterator[sdxl_pb2.GenerateEvent]]:
    """A gRPC stream known to wait in the queue (behind ``long_request``); cancelled on exit."""
    stub = sdxl_pb2_grpc.ImageServiceStub(channel)
    request = sdxl_pb2.GenerateRequest(prompt="waiting", steps=1, num_images=num_images)
    stream = stub.GenerateStream(request, metadata=metadata)
    try:
        assert next(stream).WhichOneof("event") == "queued"
        yield stream
    finally:
        stream.cancel()


def wait_until_idle(scrape: Any, timeout: float = 60.0) -> None:
    """Polls /metrics until nothing waits or runs (cancelled work leaves at the next step boundary)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        samples = metric_samples(scrape())
        if sample(samples, "sdxl_queue_depth") == 0 and sample(samples, "sdxl_slots_busy") == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"server still busy after {timeout}s")
