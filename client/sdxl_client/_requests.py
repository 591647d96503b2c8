"""Pure request builders shared by Client and AsyncClient (no I/O).

The client checks only what the protobuf types cannot hold (negative numbers, wrong types, unknown
formats), so that such mistakes fail with an :class:`InvalidRequest` naming the field instead of a
protobuf ``ValueError``; the bounds (steps, sizes, ...) are the server's to check, as ServerInfo says.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from sdxl_client._errors import FieldViolation, InvalidRequest
from sdxl_client._proto.sdxl.v1 import sdxl_pb2
from sdxl_client._types import ImageFormat

_UINT32_MAX = 2**32 - 1
_UINT64_MAX = 2**64 - 1


def new_request_id() -> str:
    """A fresh request identifier; a retried request keeps its identifier."""
    return uuid.uuid4().hex


def build_generate_request(
    prompt: str,
    *,
    negative_prompt: str = "",
    seed: int | None = None,
    num_images: int = 0,
    steps: int = 0,
    guidance_scale: float | None = None,
    width: int = 0,
    height: int = 0,
    format: ImageFormat | str | None = None,
    quality: int = 0,
    request_id: str | None = None,
    guidance_interval: tuple[float, float] | None = None,
    sampler: str | None = None,
    timestep_spacing: str | None = None,
    timesteps: Sequence[int] = (),
) -> sdxl_pb2.GenerateRequest:
    """Builds a GenerateRequest; zero or None means the server's default (see the proto); a
    guidance_scale of 0 is sent (no guidance), None is not.

    Raises:
        InvalidRequest: A field has the wrong type or sign, or names an unknown format; ``.field`` names it.
    """
    violations: list[FieldViolation] = []

    def check_int(name: str, value: object, maximum: int = _UINT32_MAX) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= maximum:
            violations.append(FieldViolation(name, f"must be an integer in 0..{maximum}, got {value!r}"))
            return 0
        return value

    if not isinstance(prompt, str) or not prompt.strip():
        violations.append(FieldViolation("prompt", "must be a non-empty string"))
    if not isinstance(negative_prompt, str):
        violations.append(FieldViolation("negative_prompt", "must be a string"))
    checked_seed = None if seed is None else check_int("seed", seed, _UINT64_MAX)
    counts = {
        name: check_int(name, value)
        for name, value in (
            ("num_images", num_images),
            ("steps", steps),
            ("width", width),
            ("height", height),
            ("quality", quality),
        )
    }
    if guidance_scale is not None and (
        isinstance(guidance_scale, bool) or not isinstance(guidance_scale, int | float) or guidance_scale < 0
    ):
        violations.append(FieldViolation("guidance_scale", f"must be a number >= 0, got {guidance_scale!r}"))
        guidance_scale = None
    interval = None
    if guidance_interval is not None:
        try:
            start, end = (float(x) for x in guidance_interval)
            interval = sdxl_pb2.GuidanceInterval(start=start, end=end)
        except (TypeError, ValueError):
            violations.append(
                FieldViolation("guidance_interval", f"must be (start, end), got {guidance_interval!r}")
            )
    sampler_value = _enum_value("sampler", sampler, sdxl_pb2.Sampler, violations)
    spacing_value = _enum_value("timestep_spacing", timestep_spacing, sdxl_pb2.TimestepSpacing, violations)
    checked_timesteps = [check_int("timesteps", t) for t in timesteps]
    try:
        image_format = ImageFormat.parse(format)
    except ValueError as error:
        violations.append(FieldViolation("format", str(error)))
        image_format = ImageFormat.DEFAULT
    if violations:
        names = ", ".join(v.field for v in violations)
        raise InvalidRequest(f"invalid request field(s): {names}: {violations[0].description}", violations)
    request = sdxl_pb2.GenerateRequest(
        prompt=prompt,
        negative_prompt=negative_prompt,
        format=image_format.value,
        request_id=request_id or new_request_id(),
    )
    for name, count in counts.items():
        setattr(request, name, count)
    request.sampler = sampler_value
    request.timestep_spacing = spacing_value
    request.timesteps.extend(checked_timesteps)
    if guidance_scale is not None:
        request.guidance_scale = float(guidance_scale)
    if interval is not None:
        request.guidance_interval.CopyFrom(interval)
    if checked_seed is not None:
        request.seed = checked_seed
    return request


def _enum_value(field: str, name: str | None, enum: Any, violations: list[FieldViolation]) -> Any:
    """The proto enum number of a lower-case name (``"dpmpp_2m"`` -> DPMPP_2M); None is 0, the default."""
    if name is None:
        return 0
    try:
        return int(enum.Value(str(name).upper()))
    except ValueError:
        names = [n.lower() for n in enum.keys() if not n.endswith("UNSPECIFIED")]  # noqa: SIM118 (an enum wrapper)
        violations.append(FieldViolation(field, f"{name!r} is not one of {', '.join(names)}"))
        return 0
