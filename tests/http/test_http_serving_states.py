"""The HTTP door follows the server's serving state: 503 while warming up, 200 once serving, 503 while
draining after SIGTERM, for the same reasons (and from the same gate) as gRPC's UNAVAILABLE. The server
serves TLS, so HTTPS is checked on the way (the gRPC door's certificate).

The states are built from events: warm-up is held by the test-only entry point ``held_warmup``; the
drain is kept open by a long gRPC stream that holds the only slot until the test cancels it.
"""

from __future__ import annotations

import signal

import openai
import pytest
from http_helpers import base_url, curl, long_request, self_signed_certificate
from sdxl_test_support.held_warmup import HELD_SERVER_COMMAND
from sdxl_test_support.xla_flags import xla_flags


def test_http_is_503_while_warming_up_then_serves_then_is_503_while_draining(http_server_factory, tmp_path):
    go = tmp_path / "warm-up may finish"
    cert, key = self_signed_certificate(tmp_path)
    server = http_server_factory(
        "--hold-warmup-until-file", str(go), "--slots-per-device", "1", "--max-steps", "5000",
        "--tls-cert-file", str(cert), "--tls-key-file", str(key),
        env={"XLA_FLAGS": xla_flags(devices=1)}, wait_ready=False,
        command=HELD_SERVER_COMMAND,
    )  # fmt: skip
    url = base_url(server, "https")
    https = openai.DefaultHttpxClient(verify=str(cert))
    with openai.OpenAI(base_url=url, api_key="no auth here", max_retries=0, http_client=https) as client:
        status, headers, body = curl(
            f"{url}/images/generations", "--cacert", str(cert), body={"prompt": "too early"}
        )
        assert status == 503 and int(headers["retry-after"]) >= 1
        assert body["error"]["code"] == "unavailable" and "warming up" in body["error"]["message"]
        assert [model.id for model in client.models.list()] == ["tiny"]  # describing the model is fine

        go.touch()
        server.wait_ready()
        assert len(client.images.generate(prompt="now", extra_body={"steps": 1}).data) == 1

        with server.channel() as channel, long_request(channel):
            server.process.send_signal(signal.SIGTERM)
            server.wait_for_log_entry(lambda entry: entry.get("event") == "draining")
            with pytest.raises(openai.InternalServerError) as draining:
                client.images.generate(prompt="too late", extra_body={"steps": 1})
            assert draining.value.status_code == 503 and "shutting down" in draining.value.message
        # The long request is cancelled: the drain ends, and so does the process.
        assert server.terminate() == 0
