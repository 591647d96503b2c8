"""Pure request builders shared by Client and AsyncClient (no I/O).

The client checks only what the protobuf types cannot hold (negative numbers, wrong types, unknown
formats), so that such mistakes fail with an :class:`InvalidRequest` naming the field instead of a
protobuf ``ValueError``; the bounds (steps, sizes, ...) are the server's to check, as ServerInfo says.
"""

from __future__ import annotations

import uuid

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
    guidance_scale: float = 0.0,
    width: int = 0,
    height: int = 0,
    format: ImageFormat | str | None = None,
    quality: int = 0,
    request_id: str | None = None,
) -> sdxl_pb2.GenerateRequest:
    """Builds a GenerateRequest; zero means the server's default (see the proto).

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
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, int | float) or guidance_scale < 0:
        violations.append(FieldViolation("guidance_scale", f"must be a number >= 0, got {guidance_scale!r}"))
        guidance_scale = 0.0
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
        guidance_scale=float(guidance_scale),
        format=image_format.value,
        request_id=request_id or new_request_id(),
        **counts,
    )
    if checked_seed is not None:
        request.seed = checked_seed
    return request
