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

No JAX here: both doors and the engine read it. Whether a request's choice is valid is a request rule
(request_rules.sampling_violations, the one copy, which reads these tables).
"""

from __future__ import annotations

from collections.abc import Mapping

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
