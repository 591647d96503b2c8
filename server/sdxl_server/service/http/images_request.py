"""An OpenAI ``POST /v1/images/generations`` body turned into the GenerateRequest that gRPC callers send.

Only the JSON shape is checked here (types, the ``WxH`` size, OpenAI options this server cannot honour);
everything about values - bounds, served sizes, formats, defaults - is checked after the conversion to
gRPC's message, by the gRPC door's conversion and the rules it shares with the engine
(``request_rules.py``), whose field names ``field_name`` translates back into OpenAI's, so that a caller
is told about ``n`` and ``size``, the names it sent.

Accepted: OpenAI's ``prompt``, ``model`` (absent or the served model), ``n``, ``size`` (``WxH`` or
``auto``), ``response_format`` (``b64_json``: images are returned inline, never stored), ``output_format``,
``quality`` (``auto`` or ``standard``), ``stream`` (false), ``user`` and ``safety_identifier`` (ignored);
our extensions ``negative_prompt``, ``seed``, ``steps``, ``guidance_scale`` (present, 0 included, or
absent for the model's default), ``guidance_interval`` (``{"start": 0, "end": 0.4}``), ``sampler``
(``euler``, ``ddim``, ``dpmpp_2m``, ``lcm``), ``timestep_spacing`` (``leading``, ``trailing``,
``linspace``), ``timesteps`` (a list of whole numbers), ``loras`` (``[{"name": "x", "scale": 0.8}]``,
scale optional: 1) and ``format`` (``png``, ``jpeg``, ``webp``; a
synonym of ``output_format``). Any other field is refused, naming it, rather than
silently ignored. JSON ``null`` means absent, as it does for OpenAI.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from sdxl_client._proto.sdxl.v1 import sdxl_pb2

from sdxl_server.request_rules import MAX_SEED, FieldViolation
from sdxl_server.service.request_conversion import SAMPLER_TO_PROTO, SPACING_TO_PROTO, ValidationError

RESPONSE_FORMAT = "b64_json"
FORMATS = {"png": sdxl_pb2.PNG, "jpeg": sdxl_pb2.JPEG, "webp": sdxl_pb2.WEBP}
FORMAT_NAMES = {value: name for name, value in FORMATS.items()}
_QUALITIES = ("auto", "standard")
_IGNORED = ("user", "safety_identifier")
_SIZE = re.compile(r"^\s*(\d{1,5})\s*x\s*(\d{1,5})\s*$", re.IGNORECASE)
_UINT32_MAX = 2**32 - 1

# Shared validation's names (the gRPC fields) -> the names an OpenAI caller sent.
_OPENAI_NAMES = {"num_images": "n", "width": "size", "height": "size", "request_id": "x-request-id"}


# Parses one JSON value into the message; returns what is wrong with it, or None. Takes the served model.
_Parser = Callable[[sdxl_pb2.GenerateRequest, Any, str], "str | None"]


def field_name(grpc_field: str) -> str:
    """The OpenAI-side name of a GenerateRequest field, for error messages."""
    return _OPENAI_NAMES.get(grpc_field, grpc_field)


def to_generate_request(
    body: Any, served_model: str, request_id: str = ""
) -> tuple[sdxl_pb2.GenerateRequest, str]:
    """The GenerateRequest for an images/generations body, and the output format's name.

    Raises ValidationError naming every field whose JSON shape is wrong (values are checked later, by
    the gRPC door's conversion and request_rules).
    """
    if not isinstance(body, Mapping):
        raise ValidationError([FieldViolation("body", "must be a JSON object")])
    fields = {key: value for key, value in body.items() if value is not None}
    violations: list[FieldViolation] = []

    def reject(field: str, description: str) -> None:
        violations.append(FieldViolation(field, description))

    message = sdxl_pb2.GenerateRequest(request_id=request_id)
    for field, parse in _PARSERS.items():
        if field in fields:
            problem = parse(message, fields[field], served_model)
            if problem:
                reject(field, problem)
    for field in sorted(set(fields) - set(_PARSERS) - set(_IGNORED)):
        reject(field, "is not supported by this server")
    if "format" in fields and "output_format" in fields and fields["format"] != fields["output_format"]:
        reject("format", "differs from output_format; send one of them")
    if violations:
        raise ValidationError(violations)
    return message, FORMAT_NAMES.get(message.format, "png")


def _prompt(field: str) -> _Parser:
    def parse(message: sdxl_pb2.GenerateRequest, value: Any, _model: str) -> str | None:
        if not isinstance(value, str):
            return "must be a string"
        setattr(message, field, value)
        return None

    return parse


def _whole_number(field: str, maximum: int) -> _Parser:
    def parse(message: sdxl_pb2.GenerateRequest, value: Any, _model: str) -> str | None:
        # bool is an int in Python, but true is not a number of steps
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= maximum:
            return f"must be a whole number within 0..{maximum}"
        setattr(message, field, value)
        return None

    return parse


def _n(message: sdxl_pb2.GenerateRequest, value: Any, _model: str) -> str | None:
    # OpenAI's n has no "0 means the default" convention; the upper bound is request_rules'.
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _UINT32_MAX:
        return "must be a whole number of at least 1"
    message.num_images = value
    return None


def _guidance_scale(message: sdxl_pb2.GenerateRequest, value: Any, _model: str) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "must be a number"
    message.guidance_scale = float(value)
    return None


def _guidance_interval(message: sdxl_pb2.GenerateRequest, value: Any, _model: str) -> str | None:
    # Its bounds are request_rules'; here only its shape: {"start": a, "end": b}, either may be left out.
    if not isinstance(value, Mapping) or set(value) - {"start", "end"}:
        return 'must be an object {"start": number, "end": number}'
    start, end = value.get("start", 0.0), value.get("end", 1.0)
    if any(isinstance(x, bool) or not isinstance(x, int | float) for x in (start, end)):
        return "start and end must be numbers"
    message.guidance_interval.start, message.guidance_interval.end = float(start), float(end)
    return None


def _named(field: str, values: Mapping[str, int]) -> _Parser:
    def parse(message: sdxl_pb2.GenerateRequest, value: Any, _model: str) -> str | None:
        number = values.get(value) if isinstance(value, str) else None
        if number is None:
            return f"{value!r} is not one of {', '.join(values)}"
        setattr(message, field, number)
        return None

    return parse


def _timesteps(message: sdxl_pb2.GenerateRequest, value: Any, _model: str) -> str | None:
    if not isinstance(value, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= _UINT32_MAX for t in value
    ):
        return "must be a list of whole numbers (for example [999, 749, 499, 249])"
    message.timesteps.extend(value)
    return None


def _loras(message: sdxl_pb2.GenerateRequest, value: Any, _model: str) -> str | None:
    # Names and scales are request_rules' and the engine's; here only the shape.
    if not isinstance(value, list) or not all(
        isinstance(item, Mapping) and not set(item) - {"name", "scale"} for item in value
    ):
        return 'must be a list of objects {"name": string, "scale": number}'
    for item in value:
        name, scale = item.get("name"), item.get("scale")
        if not isinstance(name, str):
            return "each name must be a string"
        ref = message.loras.add(name=name)
        if scale is not None:
            if isinstance(scale, bool) or not isinstance(scale, int | float):
                return "each scale must be a number"
            ref.scale = float(scale)
    return None


def _size(message: sdxl_pb2.GenerateRequest, value: Any, _model: str) -> str | None:
    if value == "auto":  # the server's default size
        return None
    match = _SIZE.match(value) if isinstance(value, str) else None
    if match is None:
        return "must be 'WIDTHxHEIGHT' (for example '1024x1024') or 'auto'"
    message.width, message.height = int(match.group(1)), int(match.group(2))
    if message.width == 0 or message.height == 0:
        return "width and height must be positive"
    return None


def _format(message: sdxl_pb2.GenerateRequest, value: Any, _model: str) -> str | None:
    image_format = FORMATS.get(value.lower()) if isinstance(value, str) else None
    if image_format is None:
        return f"{value!r} is not one of {', '.join(FORMATS)}"
    message.format = image_format
    return None


def _model(_message: sdxl_pb2.GenerateRequest, value: Any, served_model: str) -> str | None:
    if value != served_model:
        return f"{value!r} is not served here; this server serves {served_model!r} (GET /v1/models)"
    return None


def _response_format(_message: sdxl_pb2.GenerateRequest, value: Any, _model: str) -> str | None:
    if value != RESPONSE_FORMAT:
        return f"{value!r} is not supported: images are returned inline, use '{RESPONSE_FORMAT}'"
    return None


def _quality(_message: sdxl_pb2.GenerateRequest, value: Any, _model: str) -> str | None:
    if value not in _QUALITIES:
        return f"{value!r} is not supported; use steps and guidance_scale (or one of {', '.join(_QUALITIES)})"
    return None


def _stream(_message: sdxl_pb2.GenerateRequest, value: Any, _model: str) -> str | None:
    if value is not False:
        return "streaming is not supported over HTTP; use the gRPC GenerateStream RPC"
    return None


def _seed(message: sdxl_pb2.GenerateRequest, value: Any, _model: str) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        return f"must be a whole number within 0..{MAX_SEED}"
    message.seed = value
    return None


_PARSERS: dict[str, _Parser] = {
    "prompt": _prompt("prompt"),
    "negative_prompt": _prompt("negative_prompt"),
    "model": _model,
    "n": _n,
    "size": _size,
    "response_format": _response_format,
    "output_format": _format,
    "format": _format,
    "quality": _quality,
    "stream": _stream,
    "seed": _seed,
    "steps": _whole_number("steps", _UINT32_MAX),
    "guidance_scale": _guidance_scale,
    "guidance_interval": _guidance_interval,
    "sampler": _named("sampler", SAMPLER_TO_PROTO),
    "timestep_spacing": _named("timestep_spacing", SPACING_TO_PROTO),
    "timesteps": _timesteps,
    "loras": _loras,
}
