"""What a request may ask for: the one copy of every rule, used by both doors and by the engine.

The gRPC door (``service/request_conversion.py``) and the HTTP door (``service/http/images_request.py``)
apply the server's defaults and check what only their wire format can get wrong (an unknown enum value, a
width without a height, a JSON type); every rule about values lives here: served resolutions (and, for the
settings, what a servable resolution is), steps, guidance bounds and interval, sampler, timestep
spacing and explicit timesteps, LoRA adapters (count, names, scales), seed, images per request, prompt
(present, and its length in characters), format, quality and request id. The engine applies the same
rules again on ``submit``, so that a caller that skips the service (benchmarks, tests, another front
end) meets the same limits with the same words.

Every rule names the request field it concerns (the gRPC name; the HTTP door translates to OpenAI's).
Plain values in, ``(field, description)`` out: no JAX, no gRPC, no generated code.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence

from sdxl_server.engine.api import GenerationRequest, ImageFormat, InvalidRequestError, Limits, Resolution
from sdxl_server.engine.sampling.choices import LCM_ORIGINAL_STEPS, SAMPLERS, SPACINGS, TAKES_TIMESTEPS

# The API's seed is a uint64 (proto ``optional uint64 seed``); image i of a request uses seed + i, so the
# last image's seed must fit as well.
MAX_SEED = 2**64 - 1
# Longer text is certainly beyond 77 tokens; rejecting it bounds the work a request can make the
# tokenizer do (the byte-level tokenizer reads at least one token per few bytes). Longer prompts within
# this bound are truncated to the encoders' tokens, which the response reports.
MAX_PROMPT_CHARS = 16_384
MAX_REQUEST_ID_CHARS = 128
MIN_QUALITY, MAX_QUALITY = 1, 100
# Height and width of every served size: the VAE scales by 8 (a latent pixel is 8x8 image pixels).
RESOLUTION_MULTIPLE = 8
# Every sampler and timestep spacing the API names (diffusers' names); which of them a server runs, and
# which spacings each sampler can use, is in its Limits.


@dataclasses.dataclass(frozen=True)
class FieldViolation:
    """One rule a request broke: the field (as the gRPC API names it) and what is wrong with it."""

    field: str
    description: str


def servable_resolutions_problem(resolutions: Sequence[Resolution]) -> str | None:
    """What is wrong with a list of sizes to serve (a setting, not a request), or None."""
    if not resolutions:
        return "at least one WIDTHxHEIGHT is required"
    for resolution in resolutions:
        if not (
            resolution.width > 0
            and resolution.height > 0
            and resolution.width % RESOLUTION_MULTIPLE == 0
            and resolution.height % RESOLUTION_MULTIPLE == 0
        ):
            return f"{resolution} must have positive multiples of {RESOLUTION_MULTIPLE}"
    if len(set(resolutions)) != len(resolutions):
        return "duplicates"
    return None


def resolution_violation(wanted: Resolution, served: Sequence[Resolution]) -> FieldViolation | None:
    """A size the server does not serve, naming the dimension that is off (when the width is a served
    one, it is the height)."""
    if wanted in served:
        return None
    field = "height" if any(r.width == wanted.width for r in served) else "width"
    return FieldViolation(field, f"{wanted} is not served; use one of {', '.join(str(r) for r in served)}")


def most_images(limits: Limits) -> int:
    """Images one request may ask for. More than the whole queue holds could never be admitted: that is
    refused as a bad field, not as overload (which a client would retry forever)."""
    return min(limits.max_images_per_request, limits.max_queue)


def request_violations(
    request: GenerationRequest, limits: Limits, *, prompt_required: bool = True
) -> list[FieldViolation]:
    """Every rule ``request`` (its defaults already applied) breaks under ``limits``, in field order.

    ``prompt_required``: the API asks for a prompt (an empty one is almost always a caller's mistake), but
    the engine can denoise one (the oracle pipeline accepts it too), so the engine's own check waives it."""
    violations: list[FieldViolation] = []

    def reject(field: str, description: str) -> None:
        violations.append(FieldViolation(field, description))

    for field, text in (("prompt", request.prompt), ("negative_prompt", request.negative_prompt)):
        if not isinstance(text, str):
            reject(field, "must be text")
        elif field == "prompt" and prompt_required and not text.strip():
            reject(field, "must not be empty")
        elif len(text) > MAX_PROMPT_CHARS:
            reject(field, f"is {len(text)} characters long; at most {MAX_PROMPT_CHARS} are accepted")

    n, most = request.num_images, most_images(limits)
    if n < 1:
        reject("num_images", f"{n} is less than 1")
    elif n > most:
        reject("num_images", f"{n} is more than the {most} allowed per request")

    if not limits.min_steps <= request.steps <= limits.max_steps:
        reject("steps", f"{request.steps} is outside {limits.min_steps}..{limits.max_steps}")

    g = request.guidance_scale
    if not (math.isfinite(g) and limits.min_guidance_scale <= g <= limits.max_guidance_scale):
        reject("guidance_scale", f"{g} is outside {limits.min_guidance_scale}..{limits.max_guidance_scale}")

    violations += sampling_violations(request, limits)
    violations += lora_violations(request, limits)

    unserved = resolution_violation(request.resolution, limits.resolutions)
    if unserved is not None:
        violations.append(unserved)

    if request.seed < 0:
        reject("seed", f"{request.seed} is negative")
    elif request.seed + max(n, 1) - 1 > MAX_SEED:
        reject("seed", f"seed + num_images - 1 must be at most {MAX_SEED}")

    if not isinstance(request.image_format, ImageFormat):
        reject("format", "must be PNG, JPEG or WEBP")
    if not MIN_QUALITY <= request.quality <= MAX_QUALITY:
        reject("quality", f"{request.quality} is outside {MIN_QUALITY}..{MAX_QUALITY}")

    if len(request.request_id) > MAX_REQUEST_ID_CHARS or not request.request_id.isprintable():
        reject("request_id", f"must be at most {MAX_REQUEST_ID_CHARS} printable characters")
    return violations


def sampling_violations(request: GenerationRequest, limits: Limits) -> list[FieldViolation]:
    """The guidance interval, sampler, timestep spacing and explicit timesteps."""
    violations: list[FieldViolation] = []

    def reject(field: str, description: str) -> None:
        violations.append(FieldViolation(field, description))

    start, end = request.guidance_interval
    if not (math.isfinite(start) and math.isfinite(end) and 0 <= start <= end <= 1):
        reject("guidance_interval", f"({start:g}, {end:g}) must satisfy 0 <= start <= end <= 1")

    sampler, spacing = request.sampler, request.timestep_spacing
    usable = limits.samplers.get(sampler)
    if usable is None:
        served = ", ".join(limits.samplers)
        known = "unknown sampler" if sampler not in SAMPLERS else "not served by this server"
        reject("sampler", f"{sampler!r}: {known}; use one of {served}")
    if request.timesteps:
        if spacing:
            reject("timestep_spacing", "not allowed together with explicit timesteps")
        reject_timesteps = timesteps_problem(request.timesteps, request.steps, limits)
        if sampler in SAMPLERS and sampler not in TAKES_TIMESTEPS:
            takes = " or ".join(sorted(TAKES_TIMESTEPS))
            reject_timesteps = f"the {sampler} sampler takes none (it steps by a fixed stride); use {takes}"
        if reject_timesteps is not None:
            reject("timesteps", reject_timesteps)
    elif spacing == "":
        # Unset: the sampler's default (sampling/choices.py `sampler_spacing`, which the doors and the
        # engine's submit apply). A sampler with a schedule of its own (LCM) takes no spacing; LCM picks
        # its steps from the 50-step schedule it was distilled on.
        if usable == () and request.steps > LCM_ORIGINAL_STEPS:
            reject("steps", f"the {sampler} sampler runs at most {LCM_ORIGINAL_STEPS} steps")
    elif spacing not in SPACINGS:
        reject("timestep_spacing", f"{spacing!r}: unknown spacing; use one of {', '.join(SPACINGS)}")
    elif usable is not None and spacing not in usable:
        instead = f"use one of {', '.join(usable)}" if usable else "it has its own schedule: leave it unset"
        reject("timestep_spacing", f"the {sampler} sampler cannot use {spacing}; {instead}")
    return violations


def lora_violations(request: GenerationRequest, limits: Limits) -> list[FieldViolation]:
    """How many adapters, their names present and distinct, their scales within the bounds. Whether a
    name is in the adapter directory is the engine's question (NOT_FOUND, not a bad value)."""
    violations: list[FieldViolation] = []
    most = limits.max_loras_per_request
    if len(request.loras) > most:
        why = "this server takes none (no --lora-dir)" if most == 0 else f"at most {most} per request"
        violations.append(FieldViolation("loras", f"{len(request.loras)} adapters; {why}"))
        return violations
    low, high = limits.min_lora_scale, limits.max_lora_scale
    seen: set[str] = set()
    for index, lora in enumerate(request.loras):
        if not lora.name:
            violations.append(FieldViolation(f"loras[{index}].name", "must not be empty"))
        elif lora.name in seen:
            violations.append(FieldViolation(f"loras[{index}].name", f"{lora.name!r} is named twice"))
        seen.add(lora.name)
        if not (math.isfinite(lora.scale) and low <= lora.scale <= high):
            violations.append(
                FieldViolation(f"loras[{index}].scale", f"{lora.scale:g} is outside {low:g}..{high:g}")
            )
    return violations


def timesteps_problem(timesteps: Sequence[int], steps: int, limits: Limits) -> str | None:
    """What is wrong with explicit timesteps (strictly decreasing, within the training range, one per
    step), or None."""
    if not limits.accepts_timesteps:
        return "explicit timesteps are not served by this server"
    last = limits.train_timesteps - 1
    if any(not 0 <= t <= last for t in timesteps):
        return f"each must be within 0..{last}, the model's training timesteps"
    if any(later >= earlier for earlier, later in itertools.pairwise(timesteps)):
        return "must be strictly decreasing"
    if len(timesteps) != steps:
        return f"{len(timesteps)} timesteps for {steps} steps; give steps 0 or their count"
    return None


def check_request(request: GenerationRequest, limits: Limits) -> None:
    """The engine's check on ``submit``: raises InvalidRequestError naming the first field that breaks a
    rule (the doors have already reported every violation to their callers)."""
    violations = request_violations(request, limits, prompt_required=False)
    if violations:
        raise InvalidRequestError(violations[0].field, violations[0].description)
