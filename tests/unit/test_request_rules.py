"""The request rules both doors and the engine apply: each names its field; the bounds are the API's."""

from __future__ import annotations

import dataclasses

import pytest
from sdxl_client._proto.sdxl.v1 import sdxl_pb2
from sdxl_server.engine.api import GenerationRequest, ImageFormat, InvalidRequestError, Limits, Resolution
from sdxl_server.engine.settings import EngineConfig, SettingError
from sdxl_server.request_rules import (
    MAX_PROMPT_CHARS,
    MAX_SEED,
    check_request,
    request_violations,
    resolution_violation,
    servable_resolutions_problem,
)
from sdxl_server.service.http.images_request import to_generate_request
from sdxl_server.service.request_conversion import ValidationError, to_generation_request

SERVED = (Resolution(64, 64), Resolution(128, 64))
LIMITS = Limits(
    resolutions=SERVED,
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
GOOD = GenerationRequest(
    request_id="r1",
    prompt="a cat",
    negative_prompt="",
    seed=0,
    num_images=1,
    steps=4,
    guidance_scale=5.0,
    resolution=Resolution(64, 64),
)


def _fields(**changes) -> list[str]:
    return [v.field for v in request_violations(dataclasses.replace(GOOD, **changes), LIMITS)]


def test_a_request_within_every_bound_breaks_no_rule() -> None:
    assert request_violations(GOOD, LIMITS) == []
    check_request(GOOD, LIMITS)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"prompt": "  "}, "prompt"),
        ({"prompt": "x" * (MAX_PROMPT_CHARS + 1)}, "prompt"),
        ({"negative_prompt": "x" * (MAX_PROMPT_CHARS + 1)}, "negative_prompt"),
        ({"num_images": 0}, "num_images"),
        ({"num_images": 5}, "num_images"),
        ({"steps": 0}, "steps"),
        ({"steps": 21}, "steps"),
        ({"guidance_scale": -0.5}, "guidance_scale"),
        ({"guidance_scale": float("inf")}, "guidance_scale"),
        ({"resolution": Resolution(96, 96)}, "width"),
        ({"resolution": Resolution(64, 128)}, "height"),
        ({"seed": -1}, "seed"),
        ({"seed": MAX_SEED, "num_images": 2}, "seed"),
        ({"quality": 0}, "quality"),
        ({"request_id": "x" * 129}, "request_id"),
        ({"request_id": "line\nbreak"}, "request_id"),
    ],
)
def test_each_broken_rule_names_its_field_and_the_engine_refuses_it_too(changes, field) -> None:
    assert _fields(**changes) == [field]
    if changes == {"prompt": "  "}:  # the API's rule, not the engine's: it can denoise an empty prompt
        check_request(dataclasses.replace(GOOD, **changes), LIMITS)
        return
    with pytest.raises(InvalidRequestError) as refused:
        check_request(dataclasses.replace(GOOD, **changes), LIMITS)
    assert refused.value.field == field


def test_the_largest_seed_is_the_apis_uint64() -> None:
    assert MAX_SEED == 2**64 - 1
    assert _fields(seed=MAX_SEED) == []  # the last image's seed, seed + 0, still fits
    assert _fields(seed=MAX_SEED - 3, num_images=4) == []
    assert _fields(seed=MAX_SEED - 2, num_images=4) == ["seed"]


def test_more_images_than_the_queue_holds_is_a_bad_field_not_overload() -> None:
    small_queue = dataclasses.replace(LIMITS, max_queue=2)
    with pytest.raises(InvalidRequestError) as refused:
        check_request(dataclasses.replace(GOOD, num_images=3), small_queue)
    assert refused.value.field == "num_images" and "the 2 allowed" in str(refused.value)
    check_request(dataclasses.replace(GOOD, num_images=2), small_queue)


def test_an_unserved_size_lists_the_served_ones() -> None:
    violation = resolution_violation(Resolution(128, 128), SERVED)
    assert violation is not None
    assert violation.description == "128x128 is not served; use one of 64x64, 128x64"
    assert resolution_violation(Resolution(128, 64), SERVED) is None


@pytest.mark.parametrize(
    ("sizes", "says"),
    [
        ((), "at least one"),
        ((Resolution(1001, 1000),), "multiples of 8"),
        ((Resolution(0, 64),), "multiples of 8"),
        ((Resolution(64, 64), Resolution(64, 64)), "duplicates"),
    ],
)
def test_the_settings_serve_only_positive_multiples_of_8_once_each(sizes, says) -> None:
    problem = servable_resolutions_problem(sizes)
    assert problem is not None and says in problem
    with pytest.raises(SettingError) as refused:
        EngineConfig(model="tiny", resolutions=sizes)
    assert refused.value.field == "resolutions" and says in refused.value.message


def test_the_grpc_door_accepts_the_largest_seed_for_one_image() -> None:
    message = sdxl_pb2.GenerateRequest(prompt="a cat", seed=MAX_SEED)
    assert to_generation_request(message, LIMITS, None).seed == MAX_SEED


def test_the_http_door_accepts_the_largest_seed_and_refuses_one_more() -> None:
    message, _ = to_generate_request({"prompt": "a cat", "seed": MAX_SEED}, "tiny")
    assert to_generation_request(message, LIMITS, None).seed == MAX_SEED
    with pytest.raises(ValidationError) as refused:
        to_generate_request({"prompt": "a cat", "seed": MAX_SEED + 1}, "tiny")
    assert [v.field for v in refused.value.violations] == ["seed"]


def test_both_doors_and_the_engine_report_a_broken_rule_in_the_same_words() -> None:
    too_many_steps = dataclasses.replace(GOOD, steps=21)
    with pytest.raises(InvalidRequestError) as engine:
        check_request(too_many_steps, LIMITS)
    with pytest.raises(ValidationError) as grpc_door:
        to_generation_request(sdxl_pb2.GenerateRequest(prompt="a cat", steps=21), LIMITS, None)
    http_message, _ = to_generate_request({"prompt": "a cat", "steps": 21}, "tiny")
    with pytest.raises(ValidationError) as http_door:
        to_generation_request(http_message, LIMITS, None)
    assert engine.value.message == "21 is outside 1..20"
    assert [(v.field, v.description) for v in grpc_door.value.violations] == [("steps", engine.value.message)]
    assert [(v.field, v.description) for v in http_door.value.violations] == [("steps", engine.value.message)]


def test_the_default_format_and_quality_pass_the_rules() -> None:
    request = to_generation_request(sdxl_pb2.GenerateRequest(prompt="a cat"), LIMITS, None)
    assert (request.image_format, request.quality) == (ImageFormat.PNG, 90)
    assert request_violations(request, LIMITS) == []


def test_the_rules_import_first_in_a_fresh_interpreter() -> None:
    """The doors import the rules before anything of the engine: no import cycle through the engine's
    settings (which name the samplers) may break that."""
    import subprocess
    import sys

    command = [sys.executable, "-c", "import sdxl_server.request_rules"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
