"""Checks a request against the engine's limits; every rejection names the request field."""

from __future__ import annotations

import math

from sdxl_server.engine.api import GenerationRequest, ImageFormat, InvalidRequestError
from sdxl_server.engine.settings import EngineConfig

_MAX_SEED = 2**64 - 1  # the API's seed is a uint64


def validate_request(request: GenerationRequest, config: EngineConfig) -> None:
    def require(ok: bool, field: str, message: str) -> None:
        if not ok:
            raise InvalidRequestError(field, message)

    require(isinstance(request.prompt, str), "prompt", "must be text")
    require(isinstance(request.negative_prompt, str), "negative_prompt", "must be text")
    n = request.num_images
    # More images than the whole queue holds could never be admitted: refused as a bad field, not as
    # overload (which a client would retry forever).
    most = min(config.max_images_per_request, config.max_queue)
    require(1 <= n <= most, "num_images", f"{n} is outside [1, {most}]")
    require(
        config.min_steps <= request.steps <= config.max_steps,
        "steps",
        f"{request.steps} is outside [{config.min_steps}, {config.max_steps}]",
    )
    g = request.guidance_scale
    require(
        math.isfinite(g) and config.min_guidance_scale <= g <= config.max_guidance_scale,
        "guidance_scale",
        f"{g} is outside [{config.min_guidance_scale}, {config.max_guidance_scale}]",
    )
    if request.resolution not in config.resolutions:
        served = ", ".join(str(r) for r in config.resolutions)
        field = "height" if any(r.width == request.resolution.width for r in config.resolutions) else "width"
        raise InvalidRequestError(field, f"{request.resolution} is not served (served: {served})")
    require(request.seed >= 0 and request.seed + n - 1 <= _MAX_SEED, "seed", "must fit in 64 bits (unsigned)")
    require(isinstance(request.image_format, ImageFormat), "format", "must be PNG, JPEG or WEBP")
    require(1 <= request.quality <= 100, "quality", f"{request.quality} is outside [1, 100]")
