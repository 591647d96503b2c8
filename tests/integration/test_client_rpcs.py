"""Every method of Client and AsyncClient against a real server (the shared one, tiny model)."""

from __future__ import annotations

import asyncio

import pytest
from sdxl_client import (
    AsyncClient,
    Client,
    Done,
    GeneratedImage,
    GenerateResult,
    HealthStatus,
    ImageFormat,
    InvalidRequest,
    Progress,
    Queued,
    RetryPolicy,
    Unauthenticated,
)
from sdxl_test_support.xla_flags import xla_flags


@pytest.fixture(scope="module")
def client(shared_server):
    with Client(shared_server.target, timeout=120) as client:
        yield client


def _run(coroutine):
    return asyncio.run(coroutine)


def _check_result(result: GenerateResult, *, seed: int, count: int, size: tuple[int, int], fmt: str):
    assert isinstance(result, GenerateResult)
    assert result.seed == seed
    assert [(image.index, image.seed) for image in result.images] == [(i, seed + i) for i in range(count)]
    for image in result.images:
        assert (image.width, image.height) == size and image.format is ImageFormat[fmt]
        decoded = image.to_pil()
        assert decoded.size == size and decoded.format == fmt
    assert result.timings.total_seconds > 0


def test_generate(client):
    result = client.generate(
        "a red cube", seed=11, num_images=2, steps=2, guidance_scale=3.0, width=128, height=64, format="jpeg"
    )
    _check_result(result, seed=11, count=2, size=(128, 64), fmt="JPEG")
    assert result.steps == 2 and result.guidance_scale == pytest.approx(3.0)
    assert len(result.request_id) == 32  # the client tags every request


def test_async_generate(shared_server):
    async def generate():
        async with AsyncClient(shared_server.target, timeout=120) as client:
            return await client.generate("a red cube", seed=11, num_images=2, steps=2, format="webp")

    _check_result(_run(generate()), seed=11, count=2, size=(64, 64), fmt="WEBP")


def test_both_clients_send_the_same_request(client, shared_server):
    """Same arguments, same seed: identical images, whichever client sent them."""

    async def generate():
        async with AsyncClient(shared_server.target, timeout=120) as async_client:
            return await async_client.generate("same", negative_prompt="not", seed=5, steps=2)

    sync_result = client.generate("same", negative_prompt="not", seed=5, steps=2)
    assert _run(generate()).images[0].data == sync_result.images[0].data


def test_defaults_and_request_id(client):
    result = client.generate("defaults", request_id="mine-1")
    assert result.request_id == "mine-1" and result.steps == 4 and len(result.images) == 1
    assert result.images[0].format is ImageFormat.PNG and result.images[0].to_pil().size == (64, 64)


def test_long_prompt_is_reported_truncated(client):
    assert client.generate("a castle " * 100, steps=1).prompt_truncated


def _check_stream(events, *, count: int, steps: int, request_id: str):
    assert isinstance(events[0], Queued) and events[0].request_id == request_id
    assert isinstance(events[-1], Done) and events[-1].num_images == count
    progress = [e for e in events if isinstance(e, Progress)]
    assert progress and all(p.total_steps == count * steps for p in progress)
    assert [p.completed_steps for p in progress] == sorted(p.completed_steps for p in progress)
    images = [e for e in events if isinstance(e, GeneratedImage)]
    assert sorted(image.index for image in images) == list(range(count))
    assert all(image.to_pil().size == (64, 64) for image in images)
    assert events[-1].request_id == request_id


def test_generate_stream(client):
    events = list(client.generate_stream("a stream", num_images=2, steps=3, seed=1, request_id="s-1"))
    _check_stream(events, count=2, steps=3, request_id="s-1")


def test_async_generate_stream(shared_server):
    async def collect():
        async with AsyncClient(shared_server.target, timeout=120) as client:
            return [
                e async for e in client.generate_stream("a stream", num_images=2, steps=3, request_id="s-2")
            ]

    _check_stream(_run(collect()), count=2, steps=3, request_id="s-2")


def test_stream_images_equal_generate_images(client):
    streamed = [e for e in client.generate_stream("same", seed=9, steps=2) if isinstance(e, GeneratedImage)]
    assert streamed[0].data == client.generate("same", seed=9, steps=2).images[0].data


def test_leaving_a_stream_early_cancels_it(client):
    stream = client.generate_stream("stopped early", steps=20)
    assert isinstance(next(stream), Queued)
    stream.close()  # the generator's cleanup cancels the call; the next call works normally
    assert len(client.generate("after", steps=1).images) == 1


def test_server_info(client, shared_server):
    info = client.server_info()
    assert info.model == "tiny"
    assert [str(r) for r in info.resolutions] == ["64x64", "128x64"]
    assert (info.max_steps, info.default_steps) == (20, 4)
    assert set(info.formats) == {ImageFormat.PNG, ImageFormat.JPEG, ImageFormat.WEBP}
    assert info.slots >= 1 and info.devices >= 1 and "jax" in info.versions
    assert info.engines == 1

    async def async_info():
        async with AsyncClient(shared_server.target) as async_client:
            return await async_client.server_info()

    assert _run(async_info()) == info


def test_health(client, shared_server):
    assert client.health() is HealthStatus.SERVING
    client.wait_until_serving(30)

    async def async_health():
        async with AsyncClient(shared_server.target) as async_client:
            await async_client.wait_until_serving(30)
            return await async_client.health()

    assert _run(async_health()) is HealthStatus.SERVING


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"steps": 21}, "steps"), ({"width": 96, "height": 96}, "width"), ({"num_images": 99}, "num_images")],
)
def test_server_side_invalid_request_names_the_field(client, shared_server, kwargs, field):
    with pytest.raises(InvalidRequest) as raised:
        client.generate("bad", **kwargs)
    assert field in {v.field for v in raised.value.violations}
    assert not raised.value.retryable

    async def async_generate():
        async with AsyncClient(shared_server.target, retry=RetryPolicy(max_attempts=1)) as async_client:
            await async_client.generate("bad", **kwargs)

    with pytest.raises(InvalidRequest) as raised_async:
        _run(async_generate())
    assert raised_async.value.violations == raised.value.violations


def test_invalid_request_on_the_stream(client):
    with pytest.raises(InvalidRequest) as raised:
        list(client.generate_stream("bad", steps=21))
    assert raised.value.field == "steps"


def test_token_on_a_plaintext_channel_is_sent_as_metadata(server_factory, tmp_path):
    """Inside a cluster the channel may be plaintext and still need the token (the TLS case is elsewhere)."""
    token_file = tmp_path / "token"
    token_file.write_text("plain-token\n")
    server = server_factory("--auth-token-file", str(token_file), env={"XLA_FLAGS": xla_flags(devices=1)})
    with Client(server.target, token="plain-token", timeout=120) as client:
        assert client.generate("with token", steps=1).images[0].to_pil().size == (64, 64)
    with Client(server.target, timeout=30) as client, pytest.raises(Unauthenticated):
        client.server_info()

    async def async_info():
        async with AsyncClient(server.target, token="plain-token") as async_client:
            return await async_client.server_info()

    assert _run(async_info()).model == "tiny"
