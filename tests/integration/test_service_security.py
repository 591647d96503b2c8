"""TLS and bearer-token auth on a real server (the plaintext, no-auth case is the shared server's)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sdxl_client._proto.sdxl.v1 import sdxl_pb2
from sdxl_test_support.grpc_details import decode, image_stub
from sdxl_test_support.metrics_page import metric_samples, sample

TOKEN = "s3cret-token-for-tests"


def _self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 made with the openssl CLI (the cryptography package is not installed)."""
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


@pytest.fixture(scope="module")
def server(module_server_factory, tmp_path_factory):
    directory = tmp_path_factory.mktemp("tls")
    cert, key = _self_signed_certificate(directory)
    token_file = directory / "token"
    token_file.write_text(TOKEN + "\n")
    return module_server_factory(
        "--tls-cert-file", str(cert), "--tls-key-file", str(key), "--auth-token-file", str(token_file)
    )


def _bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def test_with_the_token_over_tls_requests_succeed(server) -> None:
    with server.channel() as channel:
        stub = image_stub(channel)
        response = stub.Generate(
            sdxl_pb2.GenerateRequest(prompt="secure", steps=1), metadata=_bearer(TOKEN), timeout=120
        )
        assert decode(response.images[0]).size == (64, 64)
        info = stub.GetServerInfo(sdxl_pb2.GetServerInfoRequest(), metadata=_bearer(TOKEN), timeout=30)
        assert info.model == "tiny"


@pytest.mark.parametrize("metadata", [(), _bearer("wrong-token"), (("authorization", TOKEN),)])
def test_without_the_right_token_every_rpc_is_unauthenticated(server, metadata) -> None:
    before = metric_samples(server.scrape_metrics())
    with server.channel() as channel:
        stub = image_stub(channel)
        calls = (
            lambda: stub.Generate(sdxl_pb2.GenerateRequest(prompt="x"), metadata=metadata, timeout=30),
            lambda: list(
                stub.GenerateStream(sdxl_pb2.GenerateRequest(prompt="x"), metadata=metadata, timeout=30)
            ),
            lambda: stub.GetServerInfo(sdxl_pb2.GetServerInfoRequest(), metadata=metadata, timeout=30),
        )
        for call in calls:
            with pytest.raises(grpc.RpcError) as caught:
                call()
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "bearer token" in caught.value.details()
    after = metric_samples(server.scrape_metrics())
    moved = sample(after, "sdxl_requests_total", method="Generate", code="UNAUTHENTICATED") - sample(
        before, "sdxl_requests_total", method="Generate", code="UNAUTHENTICATED"
    )
    assert moved == 1


def test_health_needs_no_token_so_kubernetes_probes_work(server) -> None:
    with server.channel() as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_a_plaintext_client_cannot_talk_to_the_tls_server(server) -> None:
    with grpc.insecure_channel(server.target) as channel, pytest.raises(grpc.RpcError) as caught:
        image_stub(channel).GetServerInfo(
            sdxl_pb2.GetServerInfoRequest(), metadata=_bearer(TOKEN), timeout=10
        )
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
