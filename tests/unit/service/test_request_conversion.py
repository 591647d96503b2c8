"""Request validation: defaults applied, every violation named by its field, before any admission."""

from __future__ import annotations

import pytest
from sdxl_client._proto.sdxl.v1 import sdxl_pb2
from sdxl_server.engine.api import ImageFormat, Limits, Resolution
from sdxl_server.service.request_conversion import ValidationError, to_generation_request

LIMITS = Limits(
    resolutions=(Resolution(64, 64), Resolution(96, 64)),
    min_steps=1,
    max_steps=20,
    default_steps=4,
    min_guidance_scale=0.0,
    max_guidance_scale=30.0,
    default_guidance_scale=5.0,
    max_images_per_request=4,
    max_prompt_tokens=77,
    max_queue=8,
)


def _violations(**fields) -> dict[str, str]:
    with pytest.raises(ValidationError) as caught:
        to_generation_request(sdxl_pb2.GenerateRequest(**{"prompt": "a cat", **fields}), LIMITS, None)
    return {v.field: v.description for v in caught.value.violations}


def test_zero_fields_take_the_servers_defaults() -> None:
    request = to_generation_request(sdxl_pb2.GenerateRequest(prompt="a cat"), LIMITS, None)
    assert (request.num_images, request.steps, request.guidance_scale) == (1, 4, 5.0)
    assert request.resolution == Resolution(64, 64)
    assert (request.image_format, request.quality) == (ImageFormat.PNG, 90)
    assert request.request_id and request.deadline is None
    assert 0 <= request.seed < 2**31


def test_given_fields_are_kept() -> None:
    message = sdxl_pb2.GenerateRequest(
        prompt="a cat", negative_prompt="dogs", seed=0, num_images=3, steps=20, guidance_scale=7.5,
        width=96, height=64, format=sdxl_pb2.WEBP, quality=50, request_id="r1",
    )  # fmt: skip
    request = to_generation_request(message, LIMITS, time_remaining=10.0)
    assert (request.seed, request.num_images, request.steps, request.guidance_scale) == (0, 3, 20, 7.5)
    assert (request.resolution, request.image_format, request.quality) == (
        Resolution(96, 64),
        ImageFormat.WEBP,
        50,
    )
    assert (request.request_id, request.negative_prompt) == ("r1", "dogs")
    assert request.deadline is not None


@pytest.mark.parametrize(
    ("fields", "field", "says"),
    [
        ({"prompt": "   "}, "prompt", "empty"),
        ({"prompt": "x" * 20_000}, "prompt", "characters"),
        ({"num_images": 5}, "num_images", "4"),
        ({"steps": 21}, "steps", "1..20"),
        ({"guidance_scale": 31.0}, "guidance_scale", "0.0..30.0"),
        ({"guidance_scale": float("nan")}, "guidance_scale", "nan"),
        ({"width": 128, "height": 128}, "width", "64x64, 96x64"),
        ({"height": 64}, "width", "together"),
        ({"format": 9}, "format", "PNG, JPEG, WEBP"),
        ({"quality": 101}, "quality", "1..100"),
        ({"request_id": "x" * 129}, "request_id", "128"),
        ({"seed": 2**64 - 1, "num_images": 2}, "seed", "at most"),
    ],
)
def test_each_bad_field_is_named(fields, field, says) -> None:
    violations = _violations(**fields)
    assert list(violations) == [field]
    assert says in violations[field]


def test_all_violations_are_reported_together() -> None:
    assert set(_violations(prompt="", steps=99, num_images=9)) == {"prompt", "steps", "num_images"}
