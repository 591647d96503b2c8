"""Turns a GenerateRequest message into an engine GenerationRequest, applying the server's defaults.

Validation happens before admission, so a bad request never takes a queue place. Every problem is
reported at once as (field, description) pairs, which become google.rpc.BadRequest field violations.
This module applies the API's conventions (zero or unset means the server's default; width and height go
together; the format enum) and leaves every rule about values to request_rules.py, which the HTTP door
and the engine share. Within the prompt length bound, long prompts are truncated by the engine's
tokenizer to the encoders' 77 tokens, which the response reports (``Queued.prompt_truncated``).
"""

from __future__ import annotations

import dataclasses
import secrets
import time
import uuid
from collections.abc import Callable

from sdxl_client._proto.sdxl.v1 import sdxl_pb2

from sdxl_server.engine.api import GenerationRequest, ImageFormat, Limits, LoraChoice, Resolution
from sdxl_server.engine.sampling.choices import sampler_spacing
from sdxl_server.request_rules import FieldViolation, request_violations

__all__ = [
    "DEFAULT_QUALITY",
    "FORMAT_TO_PROTO",
    "SAMPLER_TO_PROTO",
    "SPACING_TO_PROTO",
    "FieldViolation",
    "ValidationError",
    "new_request_id",
    "to_generation_request",
]

DEFAULT_QUALITY = 90
# Random seeds stay below 2**31 so that seed + index fits every PRNG key type.
_RANDOM_SEED_BITS = 31

_FORMATS = {
    sdxl_pb2.IMAGE_FORMAT_UNSPECIFIED: ImageFormat.PNG,
    sdxl_pb2.PNG: ImageFormat.PNG,
    sdxl_pb2.JPEG: ImageFormat.JPEG,
    sdxl_pb2.WEBP: ImageFormat.WEBP,
}
FORMAT_TO_PROTO = {
    ImageFormat.PNG: sdxl_pb2.PNG,
    ImageFormat.JPEG: sdxl_pb2.JPEG,
    ImageFormat.WEBP: sdxl_pb2.WEBP,
}
# The API's enums and request_rules' names (SAMPLERS, SPACINGS).
SAMPLER_TO_PROTO: dict[str, sdxl_pb2.Sampler.ValueType] = {
    "euler": sdxl_pb2.EULER,
    "ddim": sdxl_pb2.DDIM,
    "dpmpp_2m": sdxl_pb2.DPMPP_2M,
    "lcm": sdxl_pb2.LCM,
}
SPACING_TO_PROTO: dict[str, sdxl_pb2.TimestepSpacing.ValueType] = {
    "leading": sdxl_pb2.LEADING,
    "trailing": sdxl_pb2.TRAILING,
    "linspace": sdxl_pb2.LINSPACE,
}
_SAMPLERS: dict[int, str] = {number: name for name, number in SAMPLER_TO_PROTO.items()}
_SPACINGS: dict[int, str] = {number: name for name, number in SPACING_TO_PROTO.items()}


class ValidationError(Exception):
    def __init__(self, violations: list[FieldViolation]) -> None:
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in violations))
        self.violations = violations


def new_request_id() -> str:
    return uuid.uuid4().hex


def to_generation_request(
    message: sdxl_pb2.GenerateRequest, limits: Limits, time_remaining: float | None
) -> GenerationRequest:
    """Validates ``message`` against ``limits`` and fills in defaults; raises ValidationError.

    ``time_remaining`` is the caller's gRPC deadline in seconds from now (None: no deadline).
    """
    violations: list[FieldViolation] = []

    def reject(field: str, description: str) -> None:
        violations.append(FieldViolation(field, description))

    resolution = _resolution(message, limits, reject)
    image_format = _FORMATS.get(message.format)
    if image_format is None:
        names = ", ".join(sdxl_pb2.ImageFormat.Name(f) for f in _FORMATS if f)
        reject("format", f"unknown value {message.format}; use one of {names}")

    sampler = _enum_name(message.sampler, _SAMPLERS, limits.default_sampler, "sampler", reject)
    timesteps = tuple(message.timesteps)
    # With explicit timesteps no spacing applies: left empty unless the caller named one (a rule refuses).
    spacing_default = "" if timesteps else default_spacing(sampler, limits)
    spacing = _enum_name(message.timestep_spacing, _SPACINGS, spacing_default, "timestep_spacing", reject)
    interval = message.guidance_interval
    request = GenerationRequest(
        request_id=message.request_id,
        prompt=message.prompt,
        negative_prompt=message.negative_prompt,
        seed=message.seed if message.HasField("seed") else secrets.randbits(_RANDOM_SEED_BITS),
        num_images=message.num_images or 1,
        steps=message.steps or len(timesteps) or limits.default_steps,
        # Presence, not value: 0 is a real request (no guidance); unset is the model's recipe.
        guidance_scale=(
            float(message.guidance_scale)
            if message.HasField("guidance_scale")
            else limits.default_guidance_scale
        ),
        resolution=resolution,
        image_format=image_format or ImageFormat.PNG,
        quality=message.quality or DEFAULT_QUALITY,
        deadline=None if time_remaining is None else time.monotonic() + time_remaining,
        guidance_interval=(
            (float(interval.start), float(interval.end))
            if message.HasField("guidance_interval")
            else (0.0, 1.0)
        ),
        sampler=sampler,
        timestep_spacing=spacing,
        timesteps=timesteps,
        loras=tuple(
            LoraChoice(ref.name, float(ref.scale) if ref.HasField("scale") else 1.0) for ref in message.loras
        ),
    )
    violations += request_violations(request, limits)
    if violations:
        raise ValidationError(violations)
    if not request.request_id:
        # Checked before it is generated: the caller's id is the one the rules apply to.
        request = dataclasses.replace(request, request_id=new_request_id())
    return request


def default_spacing(sampler: str, limits: Limits) -> str:
    """The spacing a request that names none runs with: the model's default when its sampler can use
    it, else the sampler's first; "" for a sampler with a schedule of its own (LCM)."""
    return sampler_spacing(sampler, "", limits.default_timestep_spacing, limits.samplers)


def _enum_name(
    value: int, names: dict[int, str], default: str, field: str, reject: Callable[[str, str], None]
) -> str:
    """The rules' name of an enum value (0: `default`); a number this server's API does not define is
    refused here, since only the wire can carry one."""
    if value == 0:
        return default
    name = names.get(value)
    if name is None:
        reject(field, f"unknown value {value}; use one of {', '.join(names.values())}")
        return default
    return name


def _resolution(
    message: sdxl_pb2.GenerateRequest, limits: Limits, reject: Callable[[str, str], None]
) -> Resolution:
    """The requested size, or the default one when neither dimension is given. Whether it is served is
    request_rules' question."""
    default = limits.resolutions[0]
    if message.width == 0 and message.height == 0:
        return default
    if message.width == 0 or message.height == 0:
        served = ", ".join(str(r) for r in limits.resolutions)
        zero = "width" if message.width == 0 else "height"
        reject(
            zero, f"must be set together with {'height' if zero == 'width' else 'width'} (served: {served})"
        )
        return default
    return Resolution(message.width, message.height)
