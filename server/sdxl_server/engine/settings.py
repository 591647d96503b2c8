"""The engine's settings: one frozen value built at the edge (main.py) from flags and environment.

The engine never reads the environment itself; everything it needs arrives here.
"""

from __future__ import annotations

import dataclasses

from sdxl_server.engine.api import Resolution

POLICIES = ("continuous", "static")
DTYPES = ("auto", "float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    # An SDXL: a diffusers folder (Flax or PyTorch-layout safetensors weights), a single-file SDXL
    # .safetensors, a hub id, or "tiny" (the tiny random model, built on first use into tiny_model_dir).
    model: str
    # Served resolutions; one compiled program set each. The first is the default.
    resolutions: tuple[Resolution, ...]
    # Batch slots per device; total slots = slots_per_device x local devices.
    slots_per_device: int = 1
    # Admission queue bound, in images (not requests): a full queue rejects at once.
    max_queue: int = 64
    # "continuous": fill free slots at every step boundary; "static": start a batch only when all
    # slots are free (the reference recipe, kept for comparison).
    policy: str = "continuous"
    # Parameter dtype; "auto" is bfloat16 on TPU/GPU and float32 on CPU. Scheduler math is float32.
    dtype: str = "auto"
    # Persistent XLA compilation cache (local path or gs://); None disables it.
    compilation_cache_dir: str | None = None
    # Where "--model tiny" is built and loaded from; None means ~/.cache/sdxl-serve/tiny-sdxl.
    tiny_model_dir: str | None = None
    # The configs a single-file checkpoint is read with: a folder of diffusers configs and tokenizers, or
    # an architecture name (engine/architectures/); None is "sdxl-base". Folders bring their own.
    model_configs: str | None = None
    # Per-request bounds the service validates against (steps need no recompilation up to max_steps).
    min_steps: int = 1
    max_steps: int = 50
    default_steps: int = 30
    min_guidance_scale: float = 0.0
    max_guidance_scale: float = 30.0
    default_guidance_scale: float = 5.0
    max_images_per_request: int = 4
    # Denoising steps run per device dispatch when no waiting image could join before they end (none
    # waits, or every slot is taken for at least K more steps): amortises the per-call dispatch
    # overhead; 1 is right on TPU where a step takes ~100 ms.
    steps_per_dispatch: int = 1
    # How many denoising steps a finished image may wait for a decode batch that fills more devices
    # (decode_hold.py). It never waits when no other device has an image that could finish in time, nor
    # without a deep backlog (fewer images queued than slots): then the wait is latency, not throughput.
    decode_hold_steps: int = 4
    # Decoded batches waiting for or in the image workers before the step loop waits (backpressure).
    max_pending_decodes: int = 8
    # Threads that pull finished images to the host and encode them (PNG/JPEG/WebP) off the step loop.
    encode_workers: int = 2
    # Use only the first N local devices (None: all). Lets one process compare 1 and N devices.
    max_devices: int | None = None
    # Wall-time window over which the device busy ratio is measured.
    busy_window_seconds: float = 10.0
    # Capacity of the in-memory event trace (admissions, step boundaries, finishes) tests assert on.
    trace_capacity: int = 4096

    def __post_init__(self) -> None:
        def require(ok: bool, field: str, message: str) -> None:
            if not ok:
                raise ValueError(f"{field}: {message}")

        require(bool(self.model), "model", "must not be empty")
        require(len(self.resolutions) > 0, "resolutions", "at least one resolution is required")
        for res in self.resolutions:
            require(
                res.width > 0 and res.height > 0 and res.width % 8 == 0 and res.height % 8 == 0,
                "resolutions",
                f"{res} must have positive multiples of 8",
            )
        require(len(set(self.resolutions)) == len(self.resolutions), "resolutions", "duplicates")
        require(self.slots_per_device >= 1, "slots_per_device", "must be at least 1")
        require(self.max_queue >= 1, "max_queue", "must be at least 1")
        require(self.policy in POLICIES, "policy", f"must be one of {', '.join(POLICIES)}")
        require(self.dtype in DTYPES, "dtype", f"must be one of {', '.join(DTYPES)}")
        require(1 <= self.min_steps <= self.max_steps, "max_steps", "must be >= min_steps >= 1")
        require(
            self.min_steps <= self.default_steps <= self.max_steps,
            "default_steps",
            f"must be within [{self.min_steps}, {self.max_steps}]",
        )
        require(
            0.0 <= self.min_guidance_scale <= self.max_guidance_scale,
            "max_guidance_scale",
            "must be >= min_guidance_scale >= 0",
        )
        require(
            self.min_guidance_scale <= self.default_guidance_scale <= self.max_guidance_scale,
            "default_guidance_scale",
            "must be within the guidance bounds",
        )
        require(self.max_images_per_request >= 1, "max_images_per_request", "must be at least 1")
        require(self.steps_per_dispatch >= 1, "steps_per_dispatch", "must be at least 1")
        require(self.decode_hold_steps >= 0, "decode_hold_steps", "must not be negative")
        require(self.max_pending_decodes >= 1, "max_pending_decodes", "must be at least 1")
        require(self.encode_workers >= 1, "encode_workers", "must be at least 1")
        require(self.max_devices is None or self.max_devices >= 1, "max_devices", "must be at least 1")
        require(self.busy_window_seconds > 0, "busy_window_seconds", "must be positive")
        require(self.trace_capacity >= 0, "trace_capacity", "must not be negative")

    @property
    def default_resolution(self) -> Resolution:
        return self.resolutions[0]
