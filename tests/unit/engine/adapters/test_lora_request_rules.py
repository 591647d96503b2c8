"""The request rules for `loras`, shared by both doors and the engine: count, names, scale bounds."""

from __future__ import annotations

import dataclasses

from sdxl_server.engine.api import GenerationRequest, Limits, LoraChoice, Resolution
from sdxl_server.request_rules import request_violations

LIMITS = Limits(
    resolutions=(Resolution(64, 64),),
    min_steps=1,
    max_steps=50,
    default_steps=4,
    min_guidance_scale=0.0,
    max_guidance_scale=30.0,
    default_guidance_scale=5.0,
    max_images_per_request=4,
    max_prompt_tokens=77,
    max_queue=16,
    max_loras_per_request=2,
    min_lora_scale=-2.0,
    max_lora_scale=2.0,
)
BASE = GenerationRequest("r", "a cat", "", 0, 1, 4, 5.0, Resolution(64, 64))


def _fields(*loras: LoraChoice, limits: Limits = LIMITS) -> dict[str, str]:
    violations = request_violations(dataclasses.replace(BASE, loras=loras), limits)
    return {v.field: v.description for v in violations}


def test_stacked_adapters_within_the_bounds_pass() -> None:
    assert _fields(LoraChoice("a"), LoraChoice("b", -2.0)) == {}
    assert _fields(LoraChoice("a", 2.0)) == {}


def test_too_many_adapters_name_the_field() -> None:
    assert _fields(LoraChoice("a"), LoraChoice("b"), LoraChoice("c")) == {
        "loras": "3 adapters; at most 2 per request"
    }
    no_folder = dataclasses.replace(LIMITS, max_loras_per_request=0)
    assert "no --lora-dir" in _fields(LoraChoice("a"), limits=no_folder)["loras"]


def test_a_scale_outside_the_bounds_names_its_field() -> None:
    assert _fields(LoraChoice("a"), LoraChoice("b", 2.5)) == {"loras[1].scale": "2.5 is outside -2..2"}
    assert set(_fields(LoraChoice("a", float("nan")))) == {"loras[0].scale"}


def test_names_are_present_and_distinct() -> None:
    assert _fields(LoraChoice("")) == {"loras[0].name": "must not be empty"}
    assert _fields(LoraChoice("a"), LoraChoice("a", 0.5)) == {"loras[1].name": "'a' is named twice"}
