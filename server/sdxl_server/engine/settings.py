"""The engine's settings: one frozen value built at the edge (main.py) from flags and environment.

The engine never reads the environment itself; everything it needs arrives here. Each field that an
operator may set carries its ``--help`` text (settable.py); its flag, environment variable, parser and
shown default are derived from the field by server_settings.py, so a new engine setting is one field
here and one check in ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import math
import os

from sdxl_server import request_rules
from sdxl_server.engine.adapters.fuse_spec import FusedLora, fused_lora_problem, parse_fused_loras
from sdxl_server.engine.api import Resolution
from sdxl_server.engine.models.model_source import DEFAULT_TINY_MODEL_DIR
from sdxl_server.engine.sampling.choices import SAMPLERS, SPACINGS
from sdxl_server.settable import described, setting

POLICIES = ("continuous", "static")
DTYPES = ("auto", "float32", "bfloat16")
ATTENTIONS = ("auto", "xla", "flash")
# The value of slots_per_device and max_decode_batch for "auto": the memory plan (device/memory_plan.py)
# takes as many as fit.
AUTO = -1
AUTO_SLOTS = AUTO


def parse_count_or_auto(text: str) -> int:
    """``--slots-per-device``, ``--max-decode-batch``: a whole number (EngineConfig requires >= 1) or
    ``auto`` (AUTO). A negative number is refused here, not taken for the AUTO it is stored as."""
    if text.strip().lower() == "auto":
        return AUTO
    try:
        count = int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a whole number or auto") from None
    if count < 0:
        raise ValueError(f"{text!r}: must be at least 1, or auto")
    return count


parse_slots = parse_count_or_auto


class SettingError(ValueError):
    """A setting out of its bounds; ``str()`` is ``"<field>: <message>"``, and the server names the flag."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """The engine's settings. Fields declared with ``setting``/``described`` are also flags of
    ``sdxl-server serve`` (server_settings.py derives them); the others are set in code only."""

    # An SDXL: a diffusers folder (Flax or PyTorch-layout safetensors weights), a single-file SDXL
    # .safetensors, a hub id, or "tiny" (the tiny random model, built on first use into tiny_model_dir).
    # Required here; the server's default is "tiny" (server_settings.py).
    model: str = dataclasses.field(
        metadata=described(
            "diffusers folder (Flax or PyTorch-layout safetensors), single-file SDXL .safetensors, hub id, "
            "'tiny' (random, built on first use) or 'demo'"
        )
    )
    # Served resolutions; one compiled program set each. The first is the default. Required here; the
    # server's default depends on the model (server_settings.py).
    resolutions: tuple[Resolution, ...] = dataclasses.field(
        metadata=described("served WIDTHxHEIGHT list, the first is the default")
    )
    # Batch slots per device, in guided images (two UNet rows a step each); total slots = slots_per_device
    # x local devices. A device's capacity is 2 x this many rows, so it runs up to twice as many
    # unguided images at once (docs/ARCHITECTURE.md, "Rows are the capacity"). AUTO_SLOTS: the most that
    # fit under memory_fraction, decided at start by the memory plan (which also refuses a number that
    # does not fit, before anything is compiled for real).
    slots_per_device: int = setting(
        1,
        "guided images denoised concurrently per device (up to twice as many unguided ones), or auto: "
        "the most that fit",
        parse=parse_slots,
    )
    # Images one VAE decode call takes per device. At 1024x1024 the decode's full-size activations are
    # its cost: on v5e, 4 images at once hold 12.1 GiB of temporaries (more than the 4 slots' steps and
    # parameters together) where one holds 1.76 GiB and reads 15x fewer bytes per image
    # (docs/PERFORMANCE.md). AUTO: the most, up to the slots per device, that fit the memory plan.
    max_decode_batch: int = setting(
        AUTO,
        "images per VAE decode call per device, or auto: the most that fit",
        parse=parse_count_or_auto,
        shown_default="auto",
    )
    # The share of the device's memory (on CPU: of the host's available RAM) that parameters, slot state
    # and the largest program's temporaries may fill; the memory plan checks it at start.
    memory_fraction: float = setting(0.9, "share of device memory (host RAM on CPU) the server may fill")
    # "xla" writes each attention's score matrix to memory; "flash" never does (device/attention.py);
    # "auto" is flash on TPU and CPU, xla on GPU (measured: docs/PERFORMANCE.md, "Attention").
    attention: str = setting("auto", "attention: xla, flash or auto (flash on TPU and CPU, xla on GPU)")
    # Admission queue bound, in images (not requests): a full queue rejects at once.
    max_queue: int = setting(64, "images that may wait for a slot before RESOURCE_EXHAUSTED")
    # "continuous": fill free slots at every step boundary; "static": start a batch only when all
    # slots are free (the reference recipe, kept for comparison).
    policy: str = setting("continuous", "admission policy: continuous or static")
    # Parameter dtype; "auto" is bfloat16 on TPU/GPU and float32 on CPU. Scheduler math is float32.
    dtype: str = setting("auto", "parameter dtype: float32, bfloat16 or auto")
    # Persistent XLA compilation cache (local path or gs://); None disables it.
    compilation_cache_dir: str | None = setting(None, "persistent XLA compilation cache (path or gs://)")
    # Where "--model tiny" is built and loaded from; None means ~/.cache/sdxl-serve/tiny-sdxl.
    tiny_model_dir: str | None = setting(
        None, "where --model tiny is built", shown_default=DEFAULT_TINY_MODEL_DIR
    )
    # The configs a single-file checkpoint is read with: a folder of diffusers configs and tokenizers, or
    # an architecture name (engine/architectures/); None is "sdxl-base". Folders bring their own.
    model_configs: str | None = setting(
        None,
        "configs a single-file --model is read with: a diffusers folder of configs and tokenizers, "
        "or an architecture name",
        shown_default="sdxl-base",
    )
    # LoRA adapters merged into the base weights at start (engine/adapters/fusing.py): a distillation
    # LoRA (Lightning, Hyper-SD, LCM, DMD2) then costs nothing per step. Repeatable; in order.
    fuse_lora: tuple[FusedLora, ...] = setting(
        (),
        "LoRA .safetensors merged into the weights at start, FILE[:SCALE] (repeatable; env: comma-separated)",
        parse=parse_fused_loras,
        repeatable=True,
    )
    # LoRA adapters requests may name (engine/adapters/adapter_directory.py): a local folder, a PVC or a
    # GCS bucket mounted by GCS FUSE; files dropped in while serving are found without a restart.
    lora_dir: str | None = setting(
        None,
        "folder of LoRA .safetensors (kohya or diffusers format) requests may name",
        shown_default="none",
    )
    max_loras_per_request: int = setting(4, "most LoRA adapters one request may stack (with --lora-dir)")
    min_lora_scale: float = -2.0
    max_lora_scale: float = 2.0
    # How old the adapter folder's listing may be when GetServerInfo asks (a request naming an adapter
    # the server does not know lists it again at once).
    lora_rescan_seconds: float = 1.0
    # The device-resident adapter bank requests' adapters load into (engine/adapters/adapter_bank.py):
    # places hold one adapter each, every layer's rank padded to lora_max_rank, so a load never
    # recompiles. Its bytes are places x (in + out) x rank over the UNet's transformer linear layers
    # (SDXL base, rank 64, bf16: about 0.32 GiB per place, by hand; replicated on every device).
    lora_places: int = setting(8, "adapters the device-resident adapter bank holds at once (with --lora-dir)")
    lora_max_rank: int = setting(64, "highest LoRA rank a per-request adapter may have (with --lora-dir)")
    # Per-request bounds the service validates against (steps need no recompilation up to max_steps).
    min_steps: int = 1
    max_steps: int = setting(50, "most denoising steps a request may ask for")
    default_steps: int = setting(30, "steps when a request leaves them at 0")
    min_guidance_scale: float = 0.0
    max_guidance_scale: float = 30.0
    # The model's recipe, what a request that leaves these out gets (a few-step distilled checkpoint is
    # served with e.g. --default-sampler lcm --default-steps 4 --default-guidance-scale 0).
    default_guidance_scale: float = setting(
        5.0, "guidance when a request leaves it unset (<= 1: none, one UNet row per step)"
    )
    default_sampler: str = setting("euler", "sampler when a request names none: " + ", ".join(SAMPLERS))
    default_timestep_spacing: str = setting(
        "leading", "timestep spacing when a request names none: " + ", ".join(SPACINGS)
    )
    max_images_per_request: int = setting(4, "most images per request")
    # Denoising steps run per device dispatch when no waiting image could join before they end (none
    # waits, or every slot is taken for at least K more steps): amortises the per-call dispatch
    # overhead; 1 is right on TPU where a step takes ~100 ms.
    steps_per_dispatch: int = setting(1, "steps per device call when no waiting image could join sooner")
    # How many denoising steps a finished image may wait for a decode batch that fills more devices
    # (decode_hold.py). It never waits when no other device has an image that could finish in time, nor
    # without a deep backlog (fewer images queued than slots): then the wait is latency, not throughput.
    decode_hold_steps: int = setting(
        4, "most steps a finished image waits to share a decode across devices, with a deep backlog"
    )
    # Decoded batches waiting for or in the image workers before the step loop waits (backpressure).
    max_pending_decodes: int = 8
    # Threads that pull finished images to the host and encode them (PNG/JPEG/WebP) off the step loop.
    encode_workers: int = 2
    # zlib's level for PNG (png_writer.py; lossless whatever the level): 1 costs a fraction of 6's CPU for
    # a few % more bytes (docs/PERFORMANCE.md, "Image encoding", measured per level and size).
    png_compression: int = setting(1, "PNG zlib level, 0 (stored) .. 9 (smallest, slowest)")
    # The prompt-embedding cache (prompt_cache.py): text-encoder outputs kept on the device, keyed by the
    # prompts' token ids, least recently used out first; 0 entries turns it off.
    prompt_cache_entries: int = setting(256, "prompt embeddings kept on the device (0: no cache)")
    prompt_cache_mib: int = setting(256, "device memory the prompt-embedding cache may fill, MiB")
    # Use only N local devices (None: all), from the local device `first_device` on. Lets one process
    # compare 1 and N devices (bench/devices_apart.py).
    max_devices: int | None = None
    first_device: int = 0
    # An engine per device, each stepping on its own clock, behind one queue (engine/group/): no device
    # waits for the busiest one's rows or decode. Each engine compiles its own programs (N compiles).
    engine_per_device: bool = setting(
        False, "an engine per device, each on its own clock (no device waits for another); N compiles"
    )
    # Wall-time window over which the device busy ratio is measured.
    busy_window_seconds: float = 10.0
    # Capacity of the in-memory event trace (admissions, step boundaries, finishes) tests assert on.
    trace_capacity: int = 4096

    def __post_init__(self) -> None:
        """The one check of every engine setting; raises SettingError naming the field."""

        def require(ok: bool, field: str, message: str) -> None:
            if not ok:
                raise SettingError(field, message)

        require(bool(self.model), "model", "must not be empty")
        require(
            self.lora_dir is None or os.path.isdir(os.path.expanduser(self.lora_dir)),
            "lora_dir",
            f"{self.lora_dir} is not a directory",
        )
        require(self.max_loras_per_request >= 0, "max_loras_per_request", "must not be negative")
        require(
            math.isfinite(self.min_lora_scale)
            and math.isfinite(self.max_lora_scale)
            and self.min_lora_scale <= self.max_lora_scale,
            "max_lora_scale",
            "must be finite and at least min_lora_scale",
        )
        require(self.lora_rescan_seconds >= 0, "lora_rescan_seconds", "must not be negative")
        require(self.lora_places >= 1, "lora_places", "must be at least 1")
        require(self.lora_max_rank >= 1, "lora_max_rank", "must be at least 1")
        for fused in self.fuse_lora:
            problem = fused_lora_problem(fused)
            require(problem is None, "fuse_lora", str(problem))
        problem = request_rules.servable_resolutions_problem(self.resolutions)
        require(problem is None, "resolutions", str(problem))
        require(
            self.slots_per_device >= 1 or self.slots_per_device == AUTO_SLOTS,
            "slots_per_device",
            "must be at least 1, or auto",
        )
        require(
            self.max_decode_batch >= 1 or self.max_decode_batch == AUTO,
            "max_decode_batch",
            "must be at least 1, or auto",
        )
        require(0 < self.memory_fraction <= 1, "memory_fraction", "must be within (0, 1]")
        require(self.attention in ATTENTIONS, "attention", f"must be one of {', '.join(ATTENTIONS)}")
        require(self.max_queue >= 1, "max_queue", "must be at least 1")
        require(self.policy in POLICIES, "policy", f"must be one of {', '.join(POLICIES)}")
        require(self.dtype in DTYPES, "dtype", f"must be one of {', '.join(DTYPES)}")
        require(self.min_steps >= 1, "min_steps", "must be at least 1")
        require(self.max_steps >= self.min_steps, "max_steps", f"must be at least {self.min_steps}")
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
        require(self.default_sampler in SAMPLERS, "default_sampler", f"must be one of {', '.join(SAMPLERS)}")
        require(
            self.default_timestep_spacing in SPACINGS,
            "default_timestep_spacing",
            f"must be one of {', '.join(SPACINGS)}",
        )
        require(self.max_images_per_request >= 1, "max_images_per_request", "must be at least 1")
        require(self.steps_per_dispatch >= 1, "steps_per_dispatch", "must be at least 1")
        require(self.decode_hold_steps >= 0, "decode_hold_steps", "must not be negative")
        require(self.max_pending_decodes >= 1, "max_pending_decodes", "must be at least 1")
        require(self.encode_workers >= 1, "encode_workers", "must be at least 1")
        require(0 <= self.png_compression <= 9, "png_compression", "must be within 0..9")
        require(self.prompt_cache_entries >= 0, "prompt_cache_entries", "must not be negative")
        require(self.prompt_cache_mib >= 0, "prompt_cache_mib", "must not be negative")
        require(self.max_devices is None or self.max_devices >= 1, "max_devices", "must be at least 1")
        require(self.first_device >= 0, "first_device", "must be at least 0")
        require(self.busy_window_seconds > 0, "busy_window_seconds", "must be positive")
        require(self.trace_capacity >= 0, "trace_capacity", "must not be negative")

    @property
    def default_resolution(self) -> Resolution:
        return self.resolutions[0]
