"""Request validation: defaults applied, every violation named by its field, before any admission."""

from __future__ import annotations

import dataclasses

import pytest
from sdxl_client._proto.sdxl.v1 import sdxl_pb2
from sdxl_server.engine.api import ImageFormat, Limits, Resolution
from sdxl_server.service.request_conversion import ValidationError, to_generation_request

LIMITS = Limits(
    resolutions=(Resolution(64, 64), Resolution(128, 64)),
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
        width=128, height=64, format=sdxl_pb2.WEBP, quality=50, request_id="r1",
    )  # fmt: skip
    request = to_generation_request(message, LIMITS, time_remaining=10.0)
    assert (request.seed, request.num_images, request.steps, request.guidance_scale) == (0, 3, 20, 7.5)
    assert (request.resolution, request.image_format, request.quality) == (
        Resolution(128, 64),
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
        ({"width": 96, "height": 96}, "width", "64x64, 128x64"),
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


# ---- guidance, sampler and timesteps (issue 22)

SAMPLING = dataclasses.replace(
    LIMITS,
    samplers={"euler": ("leading", "trailing"), "lcm": ("trailing",)},
    accepts_timesteps=True,
    default_sampler="lcm",
    default_timestep_spacing="trailing",
)


def _convert(limits: Limits = SAMPLING, **fields):
    return to_generation_request(sdxl_pb2.GenerateRequest(prompt="a cat", **fields), limits, None)


def test_guidance_zero_is_honoured_and_unset_guidance_is_the_models_default() -> None:
    assert _convert(guidance_scale=0.0).guidance_scale == 0.0
    assert _convert().guidance_scale == LIMITS.default_guidance_scale


def test_unset_sampler_and_spacing_take_the_models_recipe() -> None:
    request = _convert()
    assert (request.sampler, request.timestep_spacing, request.guidance_interval) == (
        "lcm",
        "trailing",
        (0.0, 1.0),
    )
    request = _convert(sampler=sdxl_pb2.EULER, timestep_spacing=sdxl_pb2.LEADING)
    assert (request.sampler, request.timestep_spacing) == ("euler", "leading")


def test_a_guidance_interval_is_kept_as_float32_fractions() -> None:
    request = _convert(guidance_interval=sdxl_pb2.GuidanceInterval(start=0.0, end=0.4))
    assert request.guidance_interval == pytest.approx((0.0, 0.4))


def test_explicit_timesteps_set_the_steps_and_no_spacing() -> None:
    request = _convert(timesteps=[999, 749, 499, 249])
    assert (request.steps, request.timesteps, request.timestep_spacing) == (4, (999, 749, 499, 249), "")


@pytest.mark.parametrize(
    ("fields", "field", "says"),
    [
        ({"sampler": 9}, "sampler", "unknown value 9"),
        ({"sampler": sdxl_pb2.DDIM}, "sampler", "not served"),
        ({"timestep_spacing": 7}, "timestep_spacing", "unknown value 7"),
        ({"sampler": sdxl_pb2.LCM, "timestep_spacing": sdxl_pb2.LEADING}, "timestep_spacing", "lcm"),
        ({"guidance_interval": sdxl_pb2.GuidanceInterval(start=0.6, end=0.4)}, "guidance_interval", "start"),
        ({"guidance_interval": sdxl_pb2.GuidanceInterval(start=0.0, end=1.5)}, "guidance_interval", "<= 1"),
        ({"timesteps": [249, 499]}, "timesteps", "strictly decreasing"),
        ({"timesteps": [1000, 499]}, "timesteps", "0..999"),
        ({"timesteps": [999, 499], "steps": 3}, "timesteps", "2 timesteps for 3 steps"),
        ({"timesteps": [999], "timestep_spacing": sdxl_pb2.TRAILING}, "timestep_spacing", "together"),
    ],
)
def test_each_bad_sampling_field_is_named(fields, field, says) -> None:
    with pytest.raises(ValidationError) as caught:
        _convert(**fields)
    violations = {v.field: v.description for v in caught.value.violations}
    assert list(violations) == [field]
    assert says in violations[field]


def test_a_server_without_explicit_timesteps_says_so() -> None:
    with pytest.raises(ValidationError, match="timesteps: explicit timesteps are not served"):
        _convert(dataclasses.replace(SAMPLING, accepts_timesteps=False), timesteps=[999, 499])


def test_a_sampler_with_a_schedule_of_its_own_takes_no_spacing_and_others_take_one_they_can_use() -> None:
    limits = dataclasses.replace(SAMPLING, samplers={"euler": ("trailing",), "lcm": ()})
    assert _convert(limits, sampler=sdxl_pb2.LCM).timestep_spacing == ""
    assert _convert(limits, sampler=sdxl_pb2.EULER).timestep_spacing == "trailing"
    with pytest.raises(ValidationError, match="timestep_spacing: the lcm sampler cannot use leading"):
        _convert(limits, sampler=sdxl_pb2.LCM, timestep_spacing=sdxl_pb2.LEADING)
