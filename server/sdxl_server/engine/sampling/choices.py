"""Which samplers exist, which timestep spacings each can use, and whether it takes explicit timesteps.

The names are diffusers' (`timestep_spacing` values) and the API's (`Sampler` enum, lower case). What a
sampler can use follows the diffusers scheduler it reproduces:

* euler (EulerDiscreteScheduler): leading, linspace, trailing, or explicit timesteps;
* ddim (DDIMScheduler): leading, linspace, trailing; it steps by a fixed stride (train steps // steps), so
  explicit timesteps are not accepted;
* dpmpp_2m (DPMSolverMultistepScheduler, DPM-Solver++ 2M): leading, linspace, trailing;
* lcm (LCMScheduler): its own schedule, `num_inference_steps` picked from the `original_inference_steps`
  schedule it was distilled on (LCMScheduler ignores `timestep_spacing`), or explicit timesteps (DMD2's
  999, 749, 499, 249).

No JAX here: both doors and the engine read it.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

SAMPLERS = ("euler", "ddim", "dpmpp_2m", "lcm")
SPACINGS = ("leading", "trailing", "linspace")

# The spacings each sampler can use; an empty tuple: the sampler has its own schedule.
SAMPLER_SPACINGS: dict[str, tuple[str, ...]] = {
    "euler": SPACINGS,
    "ddim": SPACINGS,
    "dpmpp_2m": SPACINGS,
    "lcm": (),
}
# Samplers that accept explicit `timesteps`.
TAKES_TIMESTEPS = frozenset({"euler", "lcm"})
# LCMScheduler's default `original_inference_steps`: its own schedule has at most this many steps.
LCM_ORIGINAL_STEPS = 50


def sampler_spacing(
    sampler: str,
    requested: str,
    model_default: str,
    served: Mapping[str, tuple[str, ...]] = SAMPLER_SPACINGS,
) -> str:
    """The spacing a request runs with: its own, else the model's default when the sampler can use it,
    else the sampler's first ("" for a sampler with its own schedule). `served`: the spacings of each
    sampler the server runs (Limits.samplers); a sampler it does not run gets the model's default, so
    that only the sampler is refused. The one copy of this rule: both doors and the engine's `submit`
    (for a caller that leaves `timestep_spacing` empty) apply it."""
    if requested:
        return requested
    usable = served.get(sampler)
    if usable is None or model_default in usable:
        return model_default
    return usable[0] if usable else ""


def choice_problem(
    sampler: str, spacing: str, timesteps: Sequence[int], steps: int, train_timesteps: int
) -> tuple[str, str] | None:
    """(field, what is wrong) for a sampler choice that cannot run, or None.

    `spacing` is "" when none applies (explicit timesteps, or a sampler with its own schedule)."""
    if sampler not in SAMPLER_SPACINGS:
        return "sampler", f"{sampler!r} is not a sampler; use one of {', '.join(SAMPLERS)}"
    usable = SAMPLER_SPACINGS[sampler]
    if timesteps:
        if sampler not in TAKES_TIMESTEPS:
            takes = " or ".join(sorted(TAKES_TIMESTEPS))
            return "timesteps", f"the {sampler} sampler does not take explicit timesteps (use {takes})"
        if spacing:
            return "timestep_spacing", "not allowed together with explicit timesteps"
        last = train_timesteps - 1
        if any(not 0 <= t <= last for t in timesteps):
            return "timesteps", f"each must be within 0..{last}, the model's training timesteps"
        if any(later >= earlier for earlier, later in itertools.pairwise(timesteps)):
            return "timesteps", "must be strictly decreasing"
        if len(timesteps) != steps:
            return "timesteps", f"{len(timesteps)} timesteps for {steps} steps"
        return None
    if spacing and spacing not in SPACINGS:
        return "timestep_spacing", f"{spacing!r} is not a spacing; use one of {', '.join(SPACINGS)}"
    if not usable:
        if spacing:
            return (
                "timestep_spacing",
                f"the {sampler} sampler has its own schedule and cannot use {spacing}; "
                "leave it unset or give explicit timesteps",
            )
        if steps > LCM_ORIGINAL_STEPS:
            return "steps", f"the {sampler} sampler runs at most {LCM_ORIGINAL_STEPS} steps"
        return None
    if spacing not in usable:
        usable_names = ", ".join(usable)
        return "timestep_spacing", f"the {sampler} sampler cannot use {spacing!r}; use one of {usable_names}"
    return None
