"""Error classes and retries of both clients against a real server that is easy to fill and needs auth.

The server has one device, one slot, a one-image queue, TLS and a bearer token. States are built from
events, not timing: a long request holds the only slot once its first progress event arrives, and a
second one waits once it is queued; then the next request is rejected with RESOURCE_EXHAUSTED. Attempts
are counted on the server (``sdxl_requests_total{method,code}`` on /metrics).
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sdxl_client import (
    AsyncClient,
    Client,
    DeadlineExceeded,
    GenerateResult,
    InvalidRequest,
    Overloaded,
    Progress,
    Queued,
    RetryBudget,
    RetryPolicy,
    Unauthenticated,
)
from sdxl_test_support.metrics_page import metric_samples, sample
from sdxl_test_support.xla_flags import xla_flags

TOKEN = "client-tests-token"
LONG_STEPS = 5000
NO_RETRIES = RetryPolicy(max_attempts=1)


def _self_signed_certificate(directory: Path) -> Path:
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
    return cert


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("client-auth")
    cert = _self_signed_certificate(directory)
    token_file = directory / "token"
    token_file.write_text(TOKEN + "\n")
    return {"cert": cert, "key": directory / "key.pem", "token": token_file}


@pytest.fixture(scope="module")
def server(module_server_factory, files):
    return module_server_factory(
        "--slots-per-device", "1", "--max-queue", "1", "--max-steps", str(LONG_STEPS),
        "--tls-cert-file", str(files["cert"]), "--tls-key-file", str(files["key"]),
        "--auth-token-file", str(files["token"]),
        env={"XLA_FLAGS": xla_flags(devices=1)},
    )  # fmt: skip


def _client(server, files, **kwargs) -> Client:
    options = {"token": TOKEN, "tls": True, "root_certificates": files["cert"].read_bytes(), "timeout": 120}
    return Client(server.target, **{**options, **kwargs})


def _async_client(server, files, **kwargs) -> AsyncClient:
    options = {"token": TOKEN, "tls": True, "root_certificates": files["cert"].read_bytes(), "timeout": 120}
    return AsyncClient(server.target, **{**options, **kwargs})


@pytest.fixture
def client(server, files) -> Iterator[Client]:
    with _client(server, files, retry=NO_RETRIES) as client:
        yield client
    _wait_until_idle(server)


def _wait_until_idle(server, timeout: float = 60.0) -> None:
    """Polls /metrics until nothing waits or runs (cancelled work leaves at the next step boundary)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        samples = metric_samples(server.scrape_metrics())
        if sample(samples, "sdxl_queue_depth") == 0 and sample(samples, "sdxl_slots_busy") == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"server still busy after {timeout}s")


def _count(server, method: str, code: str) -> float:
    return sample(metric_samples(server.scrape_metrics()), "sdxl_requests_total", method=method, code=code)


def _settled_count(server, method: str, code: str, at_least: float, timeout: float = 30.0) -> float:
    """The counter once it reached ``at_least``: the server counts an RPC just after sending its status,
    so a scrape right after the client saw the status may not include it yet."""
    deadline = time.monotonic() + timeout
    while (count := _count(server, method, code)) < at_least and time.monotonic() < deadline:
        time.sleep(0.02)
    return count


@contextlib.contextmanager
def _busy_server(client: Client) -> Iterator[None]:
    """The only slot taken by a request that would run for minutes, until the block exits."""
    running = client.generate_stream("long", steps=LONG_STEPS, timeout=None)  # cancelled below
    try:
        assert isinstance(next(running), Queued)
        assert isinstance(next(running), Progress)  # it holds the only slot now
        yield
    finally:
        running.close()  # cancels it on the server


@contextlib.contextmanager
def _full_server(client: Client) -> Iterator[None]:
    """The only slot busy and the one-image queue full (a waiting request), until the block exits."""
    with _busy_server(client):
        waiting = client.generate_stream("waiting", steps=1, timeout=None)  # no deadline to miss behind it
        try:
            first = next(waiting)
            assert isinstance(first, Queued) and first.position == 0
            yield
        finally:
            waiting.close()


def test_tls_and_token_work_for_every_method(server, files, client):
    result = client.generate("secure", steps=1, seed=3)
    assert result.images[0].to_pil().size == (64, 64)
    assert client.server_info().slots == 1
    assert client.health().name == "SERVING"

    async def async_calls():
        async with _async_client(server, files) as async_client:
            info = await async_client.server_info()
            generated = await async_client.generate("secure", steps=1, seed=3)
            return info, generated

    info, generated = asyncio.run(async_calls())
    assert (info.slots, info.max_queue) == (1, 1)
    assert generated.images[0].data == result.images[0].data


@pytest.mark.parametrize("token", ["wrong-token", None])
def test_wrong_or_missing_token_is_unauthenticated_and_not_retried(server, files, token):
    before = _count(server, "Generate", "UNAUTHENTICATED")
    retries = []
    client = _client(server, files, token=token, on_retry=lambda *a: retries.append(a))
    with client, pytest.raises(Unauthenticated) as raised:
        client.generate("who am i", steps=1)
    assert not raised.value.retryable and retries == []
    assert _settled_count(server, "Generate", "UNAUTHENTICATED", before + 1) - before == 1

    async def async_call():
        async with _async_client(server, files, token=token) as async_client:
            await async_client.server_info()

    with pytest.raises(Unauthenticated):
        asyncio.run(async_call())


def test_full_queue_raises_overloaded_with_the_servers_retry_delay(client, server, files):
    with _full_server(client):
        with pytest.raises(Overloaded) as raised:
            client.generate("one too many", steps=1)

        async def async_call():
            async with _async_client(server, files, retry=NO_RETRIES) as async_client:
                await async_client.generate("one too many", steps=1)

        with pytest.raises(Overloaded) as raised_async:
            asyncio.run(async_call())
        with pytest.raises(Overloaded):
            list(client.generate_stream("one too many", steps=1))
    for error in (raised.value, raised_async.value):
        assert error.retryable and error.retry_after is not None and error.retry_after > 0


def test_overloaded_requests_are_retried_until_they_succeed(client, server, files):
    """Rejected while the server is full, retried with backoff, admitted once the slot frees up."""
    before_rejected = _count(server, "Generate", "RESOURCE_EXHAUSTED")
    before_ok = _count(server, "Generate", "OK")
    retries: list[tuple[object, ...]] = []
    outcome: list[GenerateResult | BaseException] = []
    patient = _client(
        server,
        files,
        timeout=120,
        retry=RetryPolicy(max_attempts=1000, initial_backoff=0.05, max_backoff=0.2),
        on_retry=lambda *a: retries.append(a),
    )

    def generate() -> None:
        try:
            outcome.append(patient.generate("patient", steps=1, seed=42, request_id="patient-1"))
        except BaseException as error:
            outcome.append(error)

    with _full_server(client):
        worker = threading.Thread(target=generate)
        worker.start()
        # Wait (by condition) until the server has rejected it at least once, then free the slot.
        deadline = time.monotonic() + 60
        while _count(server, "Generate", "RESOURCE_EXHAUSTED") == before_rejected:
            assert time.monotonic() < deadline and worker.is_alive(), outcome
            time.sleep(0.02)
    worker.join(120)
    patient.close()
    [result] = outcome
    assert isinstance(result, GenerateResult), result
    assert result.request_id == "patient-1" and result.images[0].seed == 42
    assert _settled_count(server, "Generate", "OK", before_ok + 1) - before_ok == 1
    rejected = _settled_count(server, "Generate", "RESOURCE_EXHAUSTED", before_rejected + len(retries))
    assert len(retries) >= 1 and rejected - before_rejected == len(retries)  # each retry: a real attempt
    assert all(isinstance(error, Overloaded) for error, _, _ in retries)
    # Each wait honoured the server's RetryInfo delay (up to the policy's max_backoff of 0.2 s).
    assert all(wait >= min(error.retry_after, 0.2) for error, _, wait in retries)


def test_the_retry_budget_lets_few_overloaded_calls_retry_and_fails_the_rest_fast(client, server, files):
    """Six calls of one client meet a full server: the budget's two places retry until the server has
    room, the other four get the server's Overloaded answer at once instead of joining a retry backlog."""
    budget = RetryBudget(ratio=0.0, min_retrying=2)
    policy = RetryPolicy(max_attempts=1000, initial_backoff=0.05, max_backoff=0.2, budget=budget)

    async def calls(patient: AsyncClient) -> list[GenerateResult | BaseException]:
        tasks = [asyncio.ensure_future(patient.generate("budget", steps=1, seed=i)) for i in range(6)]
        deadline = time.monotonic() + 60
        while patient.retries_refused_by_budget < 4:
            assert time.monotonic() < deadline, [t.done() for t in tasks]
            await asyncio.sleep(0.02)
        finished = [t for t in tasks if t.done()]
        # The four refused calls ended; the two with places are still retrying against the full server.
        assert len(finished) == 4 and all(isinstance(t.exception(), Overloaded) for t in finished)
        release.set()
        return await asyncio.gather(*tasks, return_exceptions=True)

    release = threading.Event()
    outcome: list[list[GenerateResult | BaseException]] = []

    async def run() -> None:
        async with _async_client(server, files, retry=policy) as patient:
            outcome.append(await calls(patient))
            assert patient.retries_refused_by_budget == 4

    worker = threading.Thread(target=lambda: asyncio.run(run()))
    with _full_server(client):
        worker.start()
        while not release.wait(0.05):
            assert worker.is_alive(), outcome
    worker.join(120)
    [results] = outcome
    refused = [r for r in results if isinstance(r, Overloaded)]
    served = [r for r in results if isinstance(r, GenerateResult)]
    assert len(refused) == 4 and len(served) == 2, results
    assert all("retry budget" in str(error) and error.retryable for error in refused)


def test_non_retryable_error_is_raised_at_once_without_retries(server, files):
    before = _count(server, "Generate", "INVALID_ARGUMENT")
    retries = []
    with (
        _client(
            server, files, retry=RetryPolicy(max_attempts=50), on_retry=lambda *a: retries.append(a)
        ) as c,
        pytest.raises(InvalidRequest) as raised,
    ):
        c.generate("too many steps", steps=LONG_STEPS + 1)
    assert raised.value.field == "steps"
    assert retries == [] and _settled_count(server, "Generate", "INVALID_ARGUMENT", before + 1) - before == 1


def test_retries_stop_at_the_callers_deadline(client, server, files):
    """Overloaded for longer than the deadline: the call ends (with the last error) long before it would
    run out of attempts: without the deadline bound it would retry for days."""
    retries = []
    endless = RetryPolicy(max_attempts=10**9, initial_backoff=0.05, max_backoff=0.1)
    patient = _client(server, files, retry=endless, on_retry=lambda *a: retries.append(a))
    with _full_server(client), patient, pytest.raises((Overloaded, DeadlineExceeded)):
        patient.generate("impatient", steps=1, timeout=1.0)
    assert len(retries) < endless.max_attempts - 1


def test_deadline_too_short_is_deadline_exceeded(client, server, files):
    """A request that cannot finish in time is rejected by the server before it takes any device time."""
    with _busy_server(client):
        with pytest.raises(DeadlineExceeded) as raised:
            client.generate("in a hurry", steps=LONG_STEPS, timeout=5)
        assert not raised.value.retryable

        async def async_call():
            async with _async_client(server, files, retry=NO_RETRIES) as async_client:
                await async_client.generate("in a hurry", steps=LONG_STEPS, timeout=5)

        with pytest.raises(DeadlineExceeded):
            asyncio.run(async_call())


def test_cli_uses_tls_and_the_token_file(server, files):
    sdxl = Path(sys.executable).parent / "sdxl"
    common = ["--target", server.target, "--ca-cert", str(files["cert"])]
    ok = subprocess.run(
        [str(sdxl), "info", "--json", *common, "--token-file", str(files["token"])],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    assert '"max_queue": 1' in ok.stdout
    denied = subprocess.run([str(sdxl), "info", *common, "--token", "nope"], capture_output=True, text=True)
    assert denied.returncode == 1
    assert denied.stderr.startswith("error: UNAUTHENTICATED") and "Traceback" not in denied.stderr
