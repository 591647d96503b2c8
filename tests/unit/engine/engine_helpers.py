"""Helpers shared by the engine tests: a listener that records events, a clock tests can move."""

from __future__ import annotations

import io
import threading
import time

import numpy as np
from PIL import Image
from sdxl_server.engine import EngineConfig
from sdxl_server.engine.api import (
    EngineEvent,
    Failed,
    Finished,
    GenerationRequest,
    ImageFormat,
    ImageReady,
    Progress,
    Resolution,
)

SQUARE = Resolution(64, 64)
# Not square: catches width/height mix-ups. 128 wide, not 96: 96/8 = 12 latent columns (6 and 3 down the
# UNet) made the tiny model's programs compile about twice as slowly on CPU.
WIDE = Resolution(128, 64)
WAIT_SECONDS = 180.0  # generous: a stuck engine fails the test instead of hanging it


class ManualClock:
    """Real monotonic time plus an offset the test controls: deadlines pass exactly when it says."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


class Recorder:
    """A listener that keeps every event; `on_progress(event)` runs inside the engine's delivery."""

    def __init__(self, on_progress=None) -> None:
        self.events: list[EngineEvent] = []
        self._done = threading.Event()
        self._on_progress = on_progress

    def __call__(self, event: EngineEvent) -> None:
        self.events.append(event)
        if isinstance(event, Progress) and self._on_progress is not None:
            self._on_progress(event)
        if isinstance(event, Finished | Failed):
            self._done.set()

    def wait(self) -> EngineEvent:
        assert self._done.wait(WAIT_SECONDS), f"request did not end; events so far: {self.events}"
        return self.events[-1]

    def images(self) -> dict[int, np.ndarray]:
        """Decoded pixels by image index."""
        return {
            e.index: np.asarray(Image.open(io.BytesIO(e.data)).convert("RGB"))
            for e in self.events
            if isinstance(e, ImageReady)
        }


def request(
    request_id: str,
    *,
    prompt: str = "a photo of a cat",
    negative_prompt: str = "",
    seed: int = 0,
    num_images: int = 1,
    steps: int = 4,
    guidance_scale: float = 7.5,
    resolution: Resolution = SQUARE,
    image_format: ImageFormat = ImageFormat.PNG,
    deadline: float | None = None,
    guidance_interval: tuple[float, float] = (0.0, 1.0),
) -> GenerationRequest:
    return GenerationRequest(
        request_id=request_id,
        prompt=prompt,
        negative_prompt=negative_prompt,
        seed=seed,
        num_images=num_images,
        steps=steps,
        guidance_scale=guidance_scale,
        resolution=resolution,
        image_format=image_format,
        deadline=deadline,
        guidance_interval=guidance_interval,
    )


def run(engine, req: GenerationRequest) -> Recorder:
    recorder = Recorder()
    engine.submit(req, recorder)
    end = recorder.wait()
    assert isinstance(end, Finished), f"{req.request_id} ended with {end}"
    return recorder


def trace_between(engine, after_boundary: int, kind: str):
    """The engine's trace events of `kind` after boundary `after_boundary`."""
    return [e for e in engine.trace() if e.kind == kind and e.boundary > after_boundary]


def bucket_of(event, resolution=SQUARE) -> int:
    """The batch size a step or decode event ran for `resolution`."""
    for field in event.detail.split():
        if field.startswith("batch="):
            for part in field.removeprefix("batch=").split(","):
                name, _, size = part.rpartition(":")
                if not name or name == str(resolution):
                    return int(size)
    raise AssertionError(f"no batch for {resolution} in {event}")


def max_level_difference(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape, (a.shape, b.shape)
    return int(np.abs(a.astype(np.int32) - b.astype(np.int32)).max())


# Shared here rather than in conftest.py: test modules import them, and `from conftest import` can
# pick up another directory's conftest when several test directories run together.


def make_config(tiny_model_dir, compilation_cache_dir, **overrides) -> EngineConfig:
    settings = {
        "model": "tiny",
        "tiny_model_dir": str(tiny_model_dir),
        "compilation_cache_dir": str(compilation_cache_dir),
        "resolutions": (SQUARE, WIDE),
        "slots_per_device": 3,
        "max_steps": 50,
        "default_steps": 4,
        "max_queue": 16,
        "steps_per_dispatch": 2,
    }
    settings.update(overrides)
    return EngineConfig(**settings)
