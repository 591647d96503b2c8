"""What each sampler can be asked for, as the engine serves it (Limits from sampling.choices) and as the
request rules report it: one violation naming the field, with words a caller can act on."""

from __future__ import annotations

import dataclasses

import pytest
from sdxl_server.engine.api import GenerationRequest, Limits, Resolution
from sdxl_server.engine.sampling.choices import SAMPLER_SPACINGS, sampler_spacing
from sdxl_server.request_rules import request_violations

LIMITS = Limits(
    resolutions=(Resolution(64, 64),),
    min_steps=1,
    max_steps=100,
    default_steps=4,
    min_guidance_scale=0.0,
    max_guidance_scale=30.0,
    default_guidance_scale=5.0,
    max_images_per_request=4,
    max_prompt_tokens=77,
    max_queue=8,
    samplers=dict(SAMPLER_SPACINGS),  # what JaxEngine.limits() reports
    accepts_timesteps=True,
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


def fields(**changes) -> list[str]:
    return [v.field for v in request_violations(dataclasses.replace(GOOD, **changes), LIMITS)]


@pytest.mark.parametrize(
    "changes",
    [
        {"sampler": "euler", "timestep_spacing": "trailing"},
        {"sampler": "ddim", "timestep_spacing": "linspace"},
        {"sampler": "dpmpp_2m", "timestep_spacing": "leading"},
        {"sampler": "lcm", "timestep_spacing": ""},
        {"sampler": "lcm", "timestep_spacing": "", "timesteps": (999, 749, 499, 249)},
        {"sampler": "euler", "timestep_spacing": "", "timesteps": (999, 749, 499, 249)},
    ],
)
def test_every_served_choice_is_accepted(changes):
    assert fields(**changes) == []


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"sampler": "ddim", "timestep_spacing": "", "timesteps": (999, 499, 249, 99)}, "timesteps"),
        ({"sampler": "dpmpp_2m", "timestep_spacing": "", "timesteps": (999, 499, 249, 99)}, "timesteps"),
        ({"sampler": "lcm", "timestep_spacing": "trailing"}, "timestep_spacing"),
        ({"sampler": "lcm", "timestep_spacing": "", "steps": 51}, "steps"),
    ],
)
def test_a_choice_the_sampler_cannot_run_names_its_field(changes, field):
    assert fields(**changes) == [field]


def test_an_unset_spacing_is_the_models_when_the_sampler_can_use_it():
    assert sampler_spacing("euler", "", "trailing") == "trailing"
    assert sampler_spacing("ddim", "linspace", "trailing") == "linspace"
    assert sampler_spacing("lcm", "", "leading") == ""  # LCM's own schedule
    assert sampler_spacing("euler", "", "leading", {"euler": ("trailing",)}) == "trailing"  # as served
    assert sampler_spacing("unknown", "", "leading") == "leading"  # only the sampler is refused
