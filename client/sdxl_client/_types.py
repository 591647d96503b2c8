"""Typed results returned by the clients, converted from the protobuf messages in one place."""

from __future__ import annotations

import enum
import pathlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias

from sdxl_client._proto.sdxl.v1 import sdxl_pb2

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

__all__ = [
    "Done",
    "GenerateResult",
    "GeneratedImage",
    "HealthStatus",
    "ImageFormat",
    "Progress",
    "Queued",
    "Resolution",
    "ServerInfo",
    "StreamEvent",
    "Timings",
]


class ImageFormat(enum.Enum):
    """Encoding of returned images. ``DEFAULT`` lets the server choose (PNG)."""

    DEFAULT = sdxl_pb2.IMAGE_FORMAT_UNSPECIFIED
    PNG = sdxl_pb2.PNG
    JPEG = sdxl_pb2.JPEG
    WEBP = sdxl_pb2.WEBP

    @property
    def extension(self) -> str:
        """File name extension without the dot (``png`` for DEFAULT)."""
        return {"DEFAULT": "png", "PNG": "png", "JPEG": "jpg", "WEBP": "webp"}[self.name]

    @classmethod
    def parse(cls, value: ImageFormat | str | int | None) -> ImageFormat:
        """Accepts an ImageFormat, a name (``"png"``, ``"JPEG"``, ``"jpg"``), a proto enum value or None.

        Raises:
            ValueError: The value names no format.
        """
        if value is None:
            return cls.DEFAULT
        if isinstance(value, ImageFormat):
            return value
        if isinstance(value, int):
            return cls(value)
        name = value.strip().upper()
        if name == "JPG":
            name = "JPEG"
        if name in ("", "UNSPECIFIED", "IMAGE_FORMAT_UNSPECIFIED"):
            name = "DEFAULT"
        try:
            return cls[name]
        except KeyError:
            raise ValueError(f"unknown image format {value!r}; use png, jpeg or webp") from None


class HealthStatus(enum.Enum):
    """Serving status reported by the standard gRPC health service."""

    UNKNOWN = 0
    SERVING = 1
    NOT_SERVING = 2
    SERVICE_UNKNOWN = 3


@dataclass(frozen=True)
class GeneratedImage:
    """One generated image.

    Attributes:
        data: Encoded bytes (see ``format``).
        format: Encoding of ``data``.
        width: Width in pixels.
        height: Height in pixels.
        seed: The seed that reproduces this image.
        index: Position of this image within its request, 0-based.
    """

    data: bytes = field(repr=False)
    format: ImageFormat
    width: int
    height: int
    seed: int
    index: int

    @classmethod
    def from_proto(cls, image: sdxl_pb2.Image) -> GeneratedImage:
        fmt = ImageFormat(image.format)
        return cls(
            data=image.data,
            format=ImageFormat.PNG if fmt is ImageFormat.DEFAULT else fmt,
            width=image.width,
            height=image.height,
            seed=image.seed,
            index=image.index,
        )

    def to_pil(self) -> PILImage:
        """Decodes the image with Pillow.

        Returns:
            A ``PIL.Image.Image``.

        Raises:
            ImportError: Pillow is not installed (``pip install 'sdxl-client[pil]'``).
        """
        import io

        try:
            from PIL import Image
        except ImportError as error:
            raise ImportError("to_pil() needs Pillow: pip install 'sdxl-client[pil]'") from error
        image = Image.open(io.BytesIO(self.data))
        image.load()
        return image

    def save(self, path: str | pathlib.Path) -> pathlib.Path:
        """Writes the encoded bytes to ``path`` unchanged and returns the path."""
        path = pathlib.Path(path)
        path.write_bytes(self.data)
        return path


@dataclass(frozen=True)
class Timings:
    """Where a request's time went on the server, in seconds."""

    queue_seconds: float
    denoise_seconds: float
    total_seconds: float

    @classmethod
    def from_proto(cls, timings: sdxl_pb2.Timings) -> Timings:
        return cls(timings.queue_seconds, timings.denoise_seconds, timings.total_seconds)


@dataclass(frozen=True)
class GenerateResult:
    """All images of one request.

    Attributes:
        images: The images in index order.
        request_id: The request's identifier (the caller's or the client's generated one).
        seed: Seed of the first image; image ``i`` used ``seed + i``.
        steps: Denoising steps run per image.
        guidance_scale: Guidance scale used.
        timings: Server-side timings.
        prompt_truncated: Whether a prompt was longer than the encoders' 77 tokens and was cut.
        unknown_words: Words of the prompts the model does not know (reported by models with a closed
            vocabulary, such as the demo model; empty otherwise). The images were still generated.
    """

    images: tuple[GeneratedImage, ...]
    request_id: str
    seed: int
    steps: int
    guidance_scale: float
    timings: Timings
    prompt_truncated: bool
    unknown_words: tuple[str, ...] = ()
    sampler: str = ""  # the sampler that ran ("euler", "ddim", "dpmpp_2m", "lcm"); "" from an older server

    @classmethod
    def from_proto(cls, response: sdxl_pb2.GenerateResponse) -> GenerateResult:
        return cls(
            images=tuple(GeneratedImage.from_proto(image) for image in response.images),
            request_id=response.request_id,
            seed=response.seed,
            steps=response.steps,
            guidance_scale=response.guidance_scale,
            timings=Timings.from_proto(response.timings),
            prompt_truncated=response.prompt_truncated,
            unknown_words=tuple(response.unknown_words),
            sampler=_enum_name(sdxl_pb2.Sampler, response.sampler),
        )


@dataclass(frozen=True)
class Queued:
    """Stream event: the request was admitted; ``position`` images wait ahead of it."""

    position: int
    request_id: str


@dataclass(frozen=True)
class Progress:
    """Stream event: denoising steps done so far, summed over the request's images."""

    completed_steps: int
    total_steps: int

    @property
    def fraction(self) -> float:
        """Completed share in [0, 1]."""
        return self.completed_steps / self.total_steps if self.total_steps else 0.0


@dataclass(frozen=True)
class Done:
    """Stream event, the last one: what GenerateResult carries, without the (already streamed) images."""

    request_id: str
    seed: int
    steps: int
    guidance_scale: float
    timings: Timings
    prompt_truncated: bool
    num_images: int
    unknown_words: tuple[str, ...] = ()  # see GenerateResult.unknown_words
    sampler: str = ""  # see GenerateResult.sampler


StreamEvent: TypeAlias = Queued | Progress | GeneratedImage | Done
"""What ``generate_stream`` yields: Queued, then Progress..., GeneratedImage (one per image), Done."""


def stream_event_from_proto(event: sdxl_pb2.GenerateEvent) -> StreamEvent | None:
    """Converts one GenerateEvent; ``None`` for an event kind this client version does not know."""
    kind = event.WhichOneof("event")
    if kind == "queued":
        return Queued(event.queued.position, event.queued.request_id)
    if kind == "progress":
        return Progress(event.progress.completed_steps, event.progress.total_steps)
    if kind == "image":
        return GeneratedImage.from_proto(event.image)
    if kind == "done":
        done = event.done
        return Done(
            request_id=done.request_id,
            seed=done.seed,
            steps=done.steps,
            guidance_scale=done.guidance_scale,
            timings=Timings.from_proto(done.timings),
            prompt_truncated=done.prompt_truncated,
            num_images=done.num_images,
            unknown_words=tuple(done.unknown_words),
            sampler=_enum_name(sdxl_pb2.Sampler, done.sampler),
        )
    return None


@dataclass(frozen=True)
class Resolution:
    """An image size the server serves."""

    width: int
    height: int

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"


@dataclass(frozen=True)
class ServerInfo:
    """The served model and the bounds a request must respect (see the proto's ServerInfo)."""

    model: str
    resolutions: tuple[Resolution, ...]
    min_steps: int
    max_steps: int
    default_steps: int
    min_guidance_scale: float
    max_guidance_scale: float
    default_guidance_scale: float
    max_images_per_request: int
    max_prompt_tokens: int
    slots: int
    devices: int
    device_kind: str
    policy: str
    dtype: str
    max_queue: int
    formats: tuple[ImageFormat, ...]
    versions: dict[str, str]
    # The model's recipe: what a request that names no sampler or spacing gets ("" from an older server).
    default_sampler: str = ""
    default_timestep_spacing: str = ""
    # Engines the devices are split into: 1 for one engine over every device (and from an older server),
    # the device count with an engine per device.
    engines: int = 1

    @classmethod
    def from_proto(cls, info: sdxl_pb2.ServerInfo) -> ServerInfo:
        return cls(
            model=info.model,
            resolutions=tuple(Resolution(r.width, r.height) for r in info.resolutions),
            min_steps=info.min_steps,
            max_steps=info.max_steps,
            default_steps=info.default_steps,
            min_guidance_scale=info.min_guidance_scale,
            max_guidance_scale=info.max_guidance_scale,
            default_guidance_scale=info.default_guidance_scale,
            max_images_per_request=info.max_images_per_request,
            max_prompt_tokens=info.max_prompt_tokens,
            slots=info.slots,
            devices=info.devices,
            device_kind=info.device_kind,
            policy=info.policy,
            dtype=info.dtype,
            max_queue=info.max_queue,
            formats=tuple(ImageFormat(f) for f in info.formats if f in _KNOWN_FORMATS),
            versions=dict(info.versions),
            default_sampler=_enum_name(sdxl_pb2.Sampler, info.default_sampler),
            default_timestep_spacing=_enum_name(sdxl_pb2.TimestepSpacing, info.default_timestep_spacing),
            engines=info.engines or 1,
        )

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable form (for ``sdxl info --json``)."""
        return {
            **{name: getattr(self, name) for name in self.__dataclass_fields__},
            "resolutions": [str(r) for r in self.resolutions],
            "formats": [f.name for f in self.formats],
        }


_KNOWN_FORMATS = {f.value for f in ImageFormat}


def _enum_name(enum: Any, value: int) -> str:
    """An API enum value as the lower-case name requests use ("dpmpp_2m"); "" for unspecified."""
    return "" if value == 0 else str(enum.Name(value)).lower()
