"""Where one request's time went inside the engine, filled in by the threads that spend it.

The caller's thread adds tokenizing; the device clock's watcher adds the text encoders' and the VAE
decode's device time (measured from the host without stalling the step loop, device_clock.py); the image
workers add the copy to the host and the image encoding, per image, concurrently (hence the lock); the
step loop marks when the last image was denoised. `Finished` carries the totals (api.py), and the
service adds its own phases around them (service/generation.py).
"""

from __future__ import annotations

import dataclasses
import threading


@dataclasses.dataclass
class RequestBudget:
    tokenize_seconds: float = 0.0
    text_encode_seconds: float = 0.0  # 0 when the prompt-embedding cache held the prompts
    decode_seconds: float = 0.0  # device time of the decode batches that held its images
    to_host_seconds: float = 0.0
    image_encode_seconds: float = 0.0
    denoised_at: float | None = None  # engine clock: when its last image ran its last step
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, phase: str, seconds: float) -> None:
        with self._lock:
            setattr(self, phase, getattr(self, phase) + seconds)
