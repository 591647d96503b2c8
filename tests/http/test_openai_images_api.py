"""The OpenAI Images API of a real server, called with the official ``openai`` client and with curl.

One server for the module: bearer token on, one device with one slot and a two-image queue, so that
overload is easy to build from events (a long gRPC stream holds the slot, a second one fills the queue).
"""

from __future__ import annotations

import base64
import io
import subprocess

import grpc
import openai
import pytest
from http_helpers import LONG_STEPS, base_url, curl, long_request, queued_request, wait_until_idle
from PIL import Image
from sdxl_client._proto.sdxl.v1 import sdxl_pb2, sdxl_pb2_grpc
from sdxl_test_support.metrics_page import metric_samples, sample
from sdxl_test_support.xla_flags import xla_flags

TOKEN = "the-http-test-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)


@pytest.fixture(scope="module")
def server(http_server_factory, tmp_path_factory):
    token_file = tmp_path_factory.mktemp("auth") / "token"
    token_file.write_text(TOKEN + "\n")
    return http_server_factory(
        "--slots-per-device", "1", "--max-queue", "2", "--max-steps", str(LONG_STEPS),
        "--auth-token-file", str(token_file),
        env={"XLA_FLAGS": xla_flags(devices=1)},
    )  # fmt: skip


@pytest.fixture(scope="module")
def client(server):
    # No retries: a test must see the server's first answer, not the client's third try.
    with openai.OpenAI(base_url=base_url(server), api_key=TOKEN, max_retries=0, timeout=120) as client:
        yield client


@pytest.fixture
def channel(server):
    with server.channel() as channel:
        yield channel
    wait_until_idle(server.scrape_metrics)


def _moved(before, after, name: str, **labels: str) -> float:
    return sample(after, name, **labels) - sample(before, name, **labels)


def test_the_openai_client_gets_the_images_grpc_gets_and_both_are_counted(server, client, channel) -> None:
    before = metric_samples(server.scrape_metrics())
    response = client.images.generate(
        prompt="a lighthouse at dusk",
        n=2,
        size="128x64",
        response_format="b64_json",
        extra_body={"negative_prompt": "fog", "seed": 1234, "steps": 2, "guidance_scale": 6.5},
    )
    after = metric_samples(server.scrape_metrics())
    over_http = [base64.b64decode(image.b64_json) for image in response.data]
    over_grpc = sdxl_pb2_grpc.ImageServiceStub(channel).Generate(
        sdxl_pb2.GenerateRequest(
            prompt="a lighthouse at dusk", negative_prompt="fog", seed=1234, num_images=2, steps=2,
            guidance_scale=6.5, width=128, height=64,
        ),
        metadata=AUTH,
        timeout=120,
    )  # fmt: skip
    assert over_http == [image.data for image in over_grpc.images]  # one path: the same bytes
    assert [Image.open(io.BytesIO(data)).size for data in over_http] == [(128, 64), (128, 64)]
    body = response.to_dict()
    assert (body["size"], body["output_format"], body["model"]) == ("128x64", "png", "tiny")
    assert (body["seed"], body["steps"], body["guidance_scale"]) == (1234, 2, 6.5)
    assert [image["seed"] for image in body["data"]] == [1234, 1235]
    assert _moved(before, after, "sdxl_requests_total", method="CreateImage", code="OK") == 1
    assert _moved(before, after, "sdxl_images_total") == 2


def test_models_lists_the_served_model(client) -> None:
    assert [model.id for model in client.models.list()] == ["tiny"]


def test_curl_generates_an_image_in_the_format_asked_for(server) -> None:
    status, headers, body = curl(
        f"{base_url(server)}/images/generations",
        "-H", f"Authorization: Bearer {TOKEN}", "-H", "X-Request-Id: curl-1",
        body={"prompt": "a red fox", "size": "64x64", "steps": 1, "format": "jpeg", "seed": 3},
    )  # fmt: skip
    assert status == 200, body
    image = Image.open(io.BytesIO(base64.b64decode(body["data"][0]["b64_json"])))
    assert (image.format, image.size) == ("JPEG", (64, 64))
    assert body["request_id"] == headers["x-request-id"] == "curl-1"


@pytest.mark.parametrize(
    ("authorization", "reason"),
    [(None, "missing bearer token"), ("Bearer not-the-token", "wrong bearer token")],
)
def test_a_call_without_the_token_is_401_and_counted(server, authorization, reason) -> None:
    before = metric_samples(server.scrape_metrics())
    args = ("-H", f"Authorization: {authorization}") if authorization else ()
    status, headers, body = curl(f"{base_url(server)}/images/generations", *args, body={"prompt": "a cat"})
    after = metric_samples(server.scrape_metrics())
    assert status == 401 and headers["www-authenticate"] == "Bearer"
    assert body["error"]["code"] == "unauthenticated" and reason in body["error"]["message"]
    assert _moved(before, after, "sdxl_requests_total", method="CreateImage", code="UNAUTHENTICATED") == 1


def test_the_openai_client_with_a_wrong_key_is_refused(server) -> None:
    wrong = openai.OpenAI(base_url=base_url(server), api_key="wrong", max_retries=0)
    with wrong, pytest.raises(openai.AuthenticationError):
        wrong.models.list()


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        ({"size": "100x100"}, "size", "is not served"),
        ({"size": "large"}, "size", "WIDTHxHEIGHT"),
        ({"n": 9}, "n", "allowed per request"),
        ({"extra_body": {"steps": LONG_STEPS + 1}}, "steps", "outside"),
        ({"extra_body": {"guidance_scale": "high"}}, "guidance_scale", "must be a number"),
        ({"extra_body": {"seed": -1}}, "seed", "whole number"),
        ({"extra_body": {"format": "gif"}}, "format", "png, jpeg, webp"),
        ({"response_format": "url"}, "response_format", "b64_json"),
        ({"model": "dall-e-3"}, "model", "'tiny'"),
        ({"style": "vivid"}, "style", "not supported"),
        ({"prompt": "   "}, "prompt", "must not be empty"),
    ],
)
def test_a_bad_field_is_400_naming_it(client, fields, param, words) -> None:
    arguments = {"prompt": "a cat", **fields}
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(**arguments)
    assert caught.value.status_code == 400
    assert caught.value.param == param and caught.value.code == "invalid_argument"
    assert words in caught.value.message


@pytest.mark.parametrize(
    "fields",
    [
        {"n": 0, "size": "big", "steps": "four"},  # wrong JSON shapes, found by the HTTP door
        {"n": 9, "size": "64x65", "steps": LONG_STEPS + 1},  # wrong values, found by the shared validation
    ],
)
def test_every_bad_field_is_named_at_once(server, fields) -> None:
    status, _, body = curl(
        f"{base_url(server)}/images/generations",
        "-H", f"Authorization: Bearer {TOKEN}",
        body={"prompt": "a cat", **fields},
    )  # fmt: skip
    assert status == 400
    message = body["error"]["message"]
    assert all(f"{field}:" in message for field in ("n", "size", "steps")), message


def test_a_body_that_is_not_json_is_400(server) -> None:
    status, _, body = curl(
        f"{base_url(server)}/images/generations", "-H", f"Authorization: Bearer {TOKEN}", "--data-binary", "{"
    )
    assert status == 400 and body["error"]["param"] == "body"


def test_a_full_queue_is_429_with_retry_after_and_counted(server, client, channel) -> None:
    with long_request(channel, AUTH), queued_request(channel, AUTH, num_images=2):
        before = metric_samples(server.scrape_metrics())
        with pytest.raises(openai.RateLimitError) as caught:
            client.images.generate(prompt="one too many", extra_body={"steps": 1})
        after = metric_samples(server.scrape_metrics())
    headers = caught.value.response.headers
    assert int(headers["retry-after"]) >= 1 and int(headers["retry-after-ms"]) > 0
    assert caught.value.code == "resource_exhausted" and "queue full" in caught.value.message
    assert _moved(before, after, "sdxl_requests_total", method="CreateImage", code="RESOURCE_EXHAUSTED") == 1


def test_the_clients_timeout_is_the_deadline_and_an_unreachable_one_is_504(server, client, channel) -> None:
    before = metric_samples(server.scrape_metrics())
    # The openai client sends its read timeout (X-Stainless-Read-Timeout): thousands of steps cannot
    # finish in 2 s even on this idle server, so the request is refused before it reaches the device.
    with pytest.raises(openai.InternalServerError) as caught:
        client.with_options(timeout=2.0).images.generate(
            prompt="in a hurry", extra_body={"steps": LONG_STEPS}
        )
    after = metric_samples(server.scrape_metrics())
    assert caught.value.status_code == 504 and caught.value.code == "deadline_exceeded"
    assert "not started" in caught.value.message
    assert _moved(before, after, "sdxl_requests_total", method="CreateImage", code="DEADLINE_EXCEEDED") == 1
    assert _moved(before, after, "sdxl_steps_total") == 0


def test_a_caller_that_hangs_up_cancels_its_request_and_frees_the_slot(server, channel) -> None:
    before = metric_samples(server.scrape_metrics())
    # curl gives up after 2 s on thousands of steps (no deadline header: the server accepts the work).
    with pytest.raises(subprocess.CalledProcessError) as gave_up:
        curl(
            f"{base_url(server)}/images/generations",
            "-H", f"Authorization: Bearer {TOKEN}", "--max-time", "2",
            body={"prompt": "never mind", "steps": LONG_STEPS},
        )  # fmt: skip
    assert gave_up.value.returncode == 28  # curl's "operation timed out"
    wait_until_idle(server.scrape_metrics)  # the slot is free again long before 5000 steps
    after = metric_samples(server.scrape_metrics())
    assert _moved(before, after, "sdxl_requests_total", method="CreateImage", code="CANCELLED") == 1
    assert _moved(before, after, "sdxl_steps_total") < LONG_STEPS


def test_a_bad_timeout_header_is_400_naming_it(server) -> None:
    status, _, body = curl(
        f"{base_url(server)}/images/generations",
        "-H", f"Authorization: Bearer {TOKEN}", "-H", "X-Request-Timeout: soon",
        body={"prompt": "a cat"},
    )  # fmt: skip
    assert status == 400 and body["error"]["param"] == "x-request-timeout"


def test_unknown_paths_and_methods_answer_in_the_openai_error_shape(server) -> None:
    status, _, body = curl(f"{base_url(server)}/images/edits", "-X", "POST")
    assert status == 404 and body["error"]["code"] == "not_found"
    status, headers, body = curl(f"{base_url(server)}/images/generations")  # GET
    assert status == 405 and "POST" in headers["allow"] and body["error"]["code"] == "method_not_allowed"


def test_grpc_still_needs_its_token(channel) -> None:
    # The HTTP door shares the token with gRPC; the gRPC check is untouched by it.
    with pytest.raises(grpc.RpcError) as caught:
        sdxl_pb2_grpc.ImageServiceStub(channel).Generate(sdxl_pb2.GenerateRequest(prompt="x"), timeout=30)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
