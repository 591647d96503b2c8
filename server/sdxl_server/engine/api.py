"""The engine's interface to the rest of the server: requests in, events out.

The service layer (gRPC) depends only on the names in this module; the engine never
imports gRPC or generated protobuf code. Events are delivered by calling the listener
that came with the request, from an engine thread: a listener must be quick and must not
block (the service bridges into asyncio with ``loop.call_soon_threadsafe``).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from typing import Protocol


class ImageFormat(enum.Enum):
    PNG = "png"
    JPEG = "jpeg"
    WEBP = "webp"


@dataclasses.dataclass(frozen=True)
class Resolution:
    width: int
    height: int

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"

    @classmethod
    def parse(cls, text: str) -> Resolution:
        """Parses ``WxH`` (e.g. ``1024x1024``)."""
        w, sep, h = text.strip().lower().partition("x")
        if not sep or not w.isdigit() or not h.isdigit():
            raise ValueError(f"resolution {text!r} is not WIDTHxHEIGHT")
        return cls(int(w), int(h))


@dataclasses.dataclass(frozen=True)
class LoraChoice:
    """One LoRA adapter a request applies: its name in the adapter directory and its strength."""

    name: str
    scale: float = 1.0


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    """One request with every default already applied (the service fills them in)."""

    request_id: str
    prompt: str
    negative_prompt: str
    seed: int
    num_images: int
    steps: int
    # Classifier-free guidance; <= 1 means none: one conditional UNet row per step (diffusers' rule).
    guidance_scale: float
    resolution: Resolution
    image_format: ImageFormat = ImageFormat.PNG
    quality: int = 90
    # Absolute time.monotonic() by which the caller needs the result, or None.
    deadline: float | None = None
    # (start, end): the fractions of the steps during which guidance applies; outside, one UNet row.
    guidance_interval: tuple[float, float] = (0.0, 1.0)
    sampler: str = "euler"  # one of Limits.samplers
    # One the sampler can use (Limits.samplers[sampler]); "" for none (explicit timesteps, or a sampler
    # with its own schedule such as LCM). Left "" otherwise, the engine's submit takes the sampler's
    # default (sampling/choices.py `sampler_spacing`: the model's when the sampler can use it).
    timestep_spacing: str = ""
    # Explicit timesteps, strictly decreasing; when given, their count is `steps`.
    timesteps: tuple[int, ...] = ()
    # LoRA adapters, stacked in order (at most Limits.max_loras_per_request).
    loras: tuple[LoraChoice, ...] = ()


# ---- events delivered to a request's listener, in this order:
# Queued, then Progress and ImageReady interleaved, then exactly one of Finished / Failed.


@dataclasses.dataclass(frozen=True)
class Queued:
    position: int  # images admitted earlier that have not entered a slot yet
    prompt_truncated: bool
    unknown_words: tuple[str, ...] = ()  # of the prompts, for a model with a closed vocabulary (the demo)


@dataclasses.dataclass(frozen=True)
class Progress:
    completed_steps: int  # summed over the request's images
    total_steps: int


@dataclasses.dataclass(frozen=True)
class ImageReady:
    index: int
    seed: int
    data: bytes
    image_format: ImageFormat
    width: int
    height: int


@dataclasses.dataclass(frozen=True)
class Finished:
    queue_seconds: float  # submitted until the first image entered a slot
    denoise_seconds: float  # the first image entering a slot until the last one was denoised
    total_seconds: float  # submitted until the last image was encoded
    # The rest of the request's time budget (engine/request_budget.py): tokenizing, the text encoders'
    # device time (0 on a prompt-embedding cache hit), the decode batches' device time, copying its
    # pixels to the host and encoding its images.
    tokenize_seconds: float = 0.0
    text_encode_seconds: float = 0.0
    decode_seconds: float = 0.0
    to_host_seconds: float = 0.0
    image_encode_seconds: float = 0.0


@dataclasses.dataclass(frozen=True)
class Failed:
    error: EngineError


EngineEvent = Queued | Progress | ImageReady | Finished | Failed
Listener = Callable[[EngineEvent], None]


# ---- errors. Recoverable ones concern one request; EngineFatalError means the engine
# is broken (device failure) and reports unhealthy from then on.


class EngineError(Exception):
    """Base of every error the engine reports."""


class InvalidRequestError(EngineError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class QueueFullError(EngineError):
    def __init__(self, message: str, retry_after_seconds: float) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds


class DeadlineUnreachableError(EngineError):
    """The request cannot finish before its deadline (or the deadline passed while queued)."""


class CancelledError(EngineError):
    """The request was cancelled by its caller."""


class NotReadyError(EngineError):
    """The engine is warming up, draining or stopped."""


class EngineFatalError(EngineError):
    """The device or the step loop failed; the engine will not recover."""


class AdapterNotFoundError(EngineError):
    """A request names a LoRA adapter the adapter directory does not hold (NOT_FOUND)."""

    def __init__(self, field: str, name: str) -> None:
        super().__init__(f"{field}: no LoRA adapter named {name!r} (GetServerInfo lists them)")
        self.field = field
        self.name = name


@dataclasses.dataclass(frozen=True)
class Limits:
    """What a request may ask for; the service validates against these."""

    resolutions: tuple[Resolution, ...]  # the first is the default
    min_steps: int
    max_steps: int
    default_steps: int
    min_guidance_scale: float
    max_guidance_scale: float
    default_guidance_scale: float
    max_images_per_request: int
    max_prompt_tokens: int
    max_queue: int  # images
    # The model's recipe: what a request that names no sampler or spacing gets.
    default_sampler: str = "euler"
    default_timestep_spacing: str = "leading"
    # Each sampler the engine runs, with the timestep spacings it can use.
    samplers: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=lambda: {"euler": ("leading",)})
    accepts_timesteps: bool = False  # whether explicit `timesteps` are served
    train_timesteps: int = 1000  # explicit timesteps lie in 0..train_timesteps-1
    # LoRA adapters one request may stack (0: the server has no adapter directory), and their scales.
    max_loras_per_request: int = 0
    min_lora_scale: float = 0.0
    max_lora_scale: float = 0.0


@dataclasses.dataclass(frozen=True)
class AdapterInfo:
    """One adapter of the adapter directory, as GetServerInfo lists it."""

    name: str
    usable: bool
    reason: str = ""  # why not, when unusable
    rank: int = 0  # the largest rank among its layers
    resident: bool = False  # its weights are in the device's adapter bank


@dataclasses.dataclass(frozen=True)
class EngineInfo:
    model: str
    limits: Limits
    slots: int
    devices: int
    device_kind: str
    policy: str
    dtype: str
    versions: dict[str, str]
    adapters: tuple[AdapterInfo, ...] = ()  # the adapter directory's files, usable or not
    # Engines the devices are split into: 1 for one engine stepping every device together, the device
    # count with an engine per device (engine/group/), each stepping on its own clock.
    engines: int = 1


@dataclasses.dataclass(frozen=True)
class EngineStats:
    """A consistent snapshot of what the step loop published (it never goes back in time)."""

    queue_depth: int  # images admitted and waiting for a slot
    slots_busy: int
    slots_total: int
    load: float  # (queue_depth + slots_busy) / slots_total
    steps_total: int
    images_total: int
    step_seconds_ewma: float  # recent device time of one batched step (0 before the first)
    device_busy_ratio: float
    compile_seconds: float
    startup_seconds: float
    ready: bool
    healthy: bool
    decode_seconds_ewma: float = 0.0  # recent device time of one decode
    # UNet row-steps still to run for the images in slots and queued (a guided step is 2, an unguided 1).
    work_ahead_row_steps: int = 0
    retry_after_seconds: float = 1.0  # when a queue place is expected to open (RetryInfo)
    # Recent device seconds of one step per resolution ("WxH"), where measured.
    step_seconds_by_resolution: dict[str, float] = dataclasses.field(default_factory=dict)
    # Admissions that found their prompts' embeddings in the prompt-embedding cache, and those that ran
    # the text encoders (counted only while the cache is on).
    prompt_cache_hits: int = 0
    prompt_cache_misses: int = 0
    # Per-request LoRA adapters (engine/adapters/adapter_loads.py): totals, and adapters resident now.
    lora_loads: int = 0
    lora_evictions: int = 0
    lora_load_seconds: float = 0.0
    lora_resident: int = 0
    lora_load_failures: int = 0
    lora_requests: int = 0
    # How full the batches ran: UNet row-steps the step programs ran (padding included; a device whose
    # block has no image at a step skips its UNet, so it runs none there) and those of
    # busy slots (2 a guided image-step, 1 an unguided one); decode calls, and the VAE rows they ran
    # (each device's decode batch, padding included: over images_total, the decode's rows an image).
    unet_row_steps_run: int = 0
    unet_row_steps_busy: int = 0
    decodes_total: int = 0
    decode_rows_run: int = 0


class Ticket(Protocol):
    request_id: str


class Engine(Protocol):
    """What the service needs from an engine: submit, cancel, health, stats."""

    def info(self) -> EngineInfo: ...

    def start(self) -> None:
        """Loads, compiles every program (warm-up) and starts the step loop. Blocks."""

    def submit(self, request: GenerationRequest, listener: Listener) -> Ticket:
        """Admits a request or raises InvalidRequestError, QueueFullError,
        DeadlineUnreachableError or NotReadyError at once (never blocks on the device)."""

    def cancel(self, ticket: Ticket) -> None:
        """Frees the request's slots at the next step boundary; the listener gets Failed(CancelledError)."""

    def stats(self) -> EngineStats: ...

    def estimate_seconds(
        self, num_images: int, steps: int, resolution: Resolution | None = None, rows_per_image: int = 2
    ) -> float | None:
        """Expected time for a new request to finish given the queue (in UNet rows) and measured step
        time; `rows_per_image`: 2 for a guided request, 1 for an unguided one (guidance_rows.peak_rows).
        None if unknown."""

    def stop(self, drain_seconds: float = 0.0) -> None:
        """Stops admitting, lets accepted work finish for up to drain_seconds, then stops the loop."""
