"""Turns a GenerateRequest message into an engine GenerationRequest, applying the server's defaults.

Validation happens before admission, so a bad request never takes a queue place. Every problem is
reported at once as (field, description) pairs, which become google.rpc.BadRequest field violations.
Prompt length is not checked here: the engine's tokenizer truncates long prompts to the encoders' 77
tokens and says so (``Queued.prompt_truncated``), which the response reports.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import time
import uuid
from collections.abc import Callable

from sdxl_client._proto.sdxl.v1 import sdxl_pb2

from sdxl_server.engine.api import GenerationRequest, ImageFormat, Limits, Resolution

# Longer text is certainly beyond 77 tokens; rejecting it bounds the work a request can make the
# tokenizer do (the byte-level tokenizer reads at least one token per few bytes).
MAX_PROMPT_CHARS = 16_384
MAX_REQUEST_ID_CHARS = 128
DEFAULT_QUALITY = 90
# Random seeds stay below 2**31 so that seed + index fits every PRNG key type.
_RANDOM_SEED_BITS = 31
_MAX_SEED = 2**63 - 1

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


@dataclasses.dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


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

    if not message.prompt.strip():
        reject("prompt", "must not be empty")
    for field, text in (("prompt", message.prompt), ("negative_prompt", message.negative_prompt)):
        if len(text) > MAX_PROMPT_CHARS:
            reject(field, f"is {len(text)} characters long; at most {MAX_PROMPT_CHARS} are accepted")

    num_images = message.num_images or 1
    if num_images > limits.max_images_per_request:
        reject(
            "num_images", f"{num_images} is more than the {limits.max_images_per_request} allowed per request"
        )

    steps = message.steps or limits.default_steps
    if not limits.min_steps <= steps <= limits.max_steps:
        reject("steps", f"{steps} is outside {limits.min_steps}..{limits.max_steps}")

    guidance = message.guidance_scale or limits.default_guidance_scale
    if not math.isfinite(guidance) or not (
        limits.min_guidance_scale <= guidance <= limits.max_guidance_scale
    ):
        reject(
            "guidance_scale",
            f"{guidance} is outside {limits.min_guidance_scale}..{limits.max_guidance_scale}",
        )

    resolution = _resolution(message, limits, reject)

    image_format = _FORMATS.get(message.format)
    if image_format is None:
        names = ", ".join(sdxl_pb2.ImageFormat.Name(f) for f in _FORMATS if f)
        reject("format", f"unknown value {message.format}; use one of {names}")

    quality = message.quality or DEFAULT_QUALITY
    if quality > 100:
        reject("quality", f"{quality} is outside 1..100")

    if len(message.request_id) > MAX_REQUEST_ID_CHARS or not message.request_id.isprintable():
        reject("request_id", f"must be at most {MAX_REQUEST_ID_CHARS} printable characters")

    seed = message.seed if message.HasField("seed") else secrets.randbits(_RANDOM_SEED_BITS)
    if seed + num_images - 1 > _MAX_SEED:
        reject("seed", f"seed + num_images - 1 must be at most {_MAX_SEED}")

    if violations:
        raise ValidationError(violations)
    return GenerationRequest(
        request_id=message.request_id or new_request_id(),
        prompt=message.prompt,
        negative_prompt=message.negative_prompt,
        seed=seed,
        num_images=num_images,
        steps=steps,
        guidance_scale=float(guidance),
        resolution=resolution,
        image_format=image_format or ImageFormat.PNG,
        quality=quality,
        deadline=None if time_remaining is None else time.monotonic() + time_remaining,
    )


def _resolution(
    message: sdxl_pb2.GenerateRequest, limits: Limits, reject: Callable[[str, str], None]
) -> Resolution:
    default = limits.resolutions[0]
    if message.width == 0 and message.height == 0:
        return default
    served = ", ".join(str(r) for r in limits.resolutions)
    if message.width == 0 or message.height == 0:
        zero = "width" if message.width == 0 else "height"
        reject(
            zero, f"must be set together with {'height' if zero == 'width' else 'width'} (served: {served})"
        )
        return default
    wanted = Resolution(message.width, message.height)
    if wanted not in limits.resolutions:
        # Name the dimension that is off: when the width is a served one, it is the height.
        field = "height" if any(r.width == wanted.width for r in limits.resolutions) else "width"
        reject(field, f"{wanted} is not served; use one of {served}")
    return wanted
