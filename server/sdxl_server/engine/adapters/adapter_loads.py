"""Per-request LoRA adapters at the step loop's boundaries: which queued images may take a slot, the
loads into the device's adapter bank, and each slot's places and scales.

- Admission (`ready`, the admission queue's `admissible`): an image whose adapters are all resident
  may take a slot; for one that is not, the missing adapters' loads start (residency.py chooses the
  place, evicting the least recently used adapter no busy slot holds) and the image stays queued,
  holding no slot, while images behind it whose adapters are resident pass it.
- Loads are asynchronous: a background thread reads the file's weights (numpy) and lays them out for
  a place (adapter_bank.BankLayout.place), the slow part; the step loop writes finished ones into the
  device bank at the top of its next boundary (`apply_loads`), so the bank, an argument of the step
  programs, only ever changes on the thread that dispatches them (device_bank.py donates it).
- A slot admitted with adapters holds them (`acquire`) until it finishes or is retired (`release`):
  what an image in progress uses is never evicted, even if its file leaves the folder.

Owned by the step loop's thread except the reader's callback, which only appends under a lock and
wakes the loop. An adapter is keyed by its `LoraFile` (the file's path and header): a file rewritten
with other layers is another adapter; one rewritten with the same header keeps the weights loaded.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from sdxl_server.engine.adapters.adapter_bank import BankLayout
from sdxl_server.engine.adapters.device_bank import DeviceBank, load_into_place
from sdxl_server.engine.adapters.lora_file import AdapterError, LoraFile
from sdxl_server.engine.adapters.request_adapters import RequestAdapters
from sdxl_server.engine.adapters.residency import AdapterResidency
from sdxl_server.engine.api import Failed, InvalidRequestError
from sdxl_server.engine.stats import LoraCounts

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class _Finished:
    key: LoraFile
    place: int
    started: float
    contents: Any = None  # BankLayout.place's by component, or None when the read failed
    error: str = ""


class AdapterLoads:
    def __init__(
        self,
        layouts: Mapping[str, BankLayout],
        banks: Mapping[str, DeviceBank],
        loras_per_request: int,
        wake: Callable[[], None],
    ) -> None:
        # By component (the UNet's, each text encoder's): the programs' arguments, replaced by each load.
        # A place holds one adapter in every component's bank (zeros where it changes nothing).
        self.banks = dict(banks)
        self._layouts = dict(layouts)
        self._places = self._layouts["unet"].places
        self._width = loras_per_request
        self._wake = wake
        self._residency = AdapterResidency(self._places, self._start_load, self._evicted)
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="sdxl-lora-load")
        self._lock = threading.Lock()
        self._finished: list[_Finished] = []  # under _lock
        self._load_seconds = 0.0
        self._written = 0
        self._failures = 0
        # The files resident now, for GetServerInfo (other threads read it: replaced, never mutated).
        self.resident_files: frozenset[Path] = frozenset()

    # ---- the step loop's thread

    def ready(self, adapters: RequestAdapters) -> bool:
        """Whether an image with `adapters` may take a slot now; starts the loads it needs."""
        if not adapters:
            return True
        return self._residency.prepare(list(adapters.files))

    def apply_loads(self, waiting: Sequence[tuple[RequestAdapters, Any]]) -> None:
        """At each boundary, before admission: writes the loads finished since the last one into the
        banks. A failed load frees its place and fails the `waiting` requests (adapters,
        TrackedRequest) that need it."""
        self._residency.new_round()
        with self._lock:
            finished, self._finished = self._finished, []
        for done in finished:
            if done.contents is None:
                self._failures += 1
                self._residency.forget(done.key, done.place)
                log.warning("LoRA adapter %s failed to load: %s", done.key.path.name, done.error)
                error = InvalidRequestError(
                    "loras", f"adapter {done.key.path.stem!r} failed to load: {done.error}"
                )
                for adapters, request in waiting:
                    if done.key in adapters.files:
                        request.deliver(Failed(error))
                continue
            for component, contents in done.contents.items():
                self.banks[component] = load_into_place(self.banks[component], done.place, contents)
            self._residency.loaded(done.key, done.place)
            self.resident_files = self.resident_files | {done.key.path}
            seconds = time.perf_counter() - done.started
            self._load_seconds += seconds
            self._written += 1
            log.info(
                "LoRA adapter %s loaded into place %d of %d in %.2fs (%d resident)",
                done.key.path.stem,
                done.place,
                self._places,
                seconds,
                self._residency.counts().resident,
            )

    def acquire(self, adapters: RequestAdapters) -> tuple[np.ndarray, np.ndarray]:
        """A slot starts with `adapters` (all resident: `ready` said so): its places and scales,
        padded with place 0 at scale 0 to the most a request may name."""
        places = np.zeros(self._width, np.int32)
        scales = np.zeros(self._width, np.float32)
        if adapters:
            held = self._residency.acquire(list(adapters.files))
            places[: len(held)] = held
            scales[: len(held)] = adapters.scales
        return places, scales

    def release(self, adapters: RequestAdapters) -> None:
        """The slot that held `adapters` is free (finished or retired)."""
        if adapters:
            self._residency.release(list(adapters.files))

    def counts(self) -> LoraCounts:
        held = self._residency.counts()
        return LoraCounts(
            loads=self._written,
            evictions=held.evictions,
            load_seconds=self._load_seconds,
            resident=held.resident,
            failures=self._failures,
        )

    def shutdown(self) -> None:
        self._reader.shutdown(wait=False, cancel_futures=True)

    # ---- residency's callback (the step loop's thread) and the reader's thread

    def _start_load(self, key: Hashable, place: int) -> None:
        assert isinstance(key, LoraFile)
        self._reader.submit(self._read, key, place, time.perf_counter())

    def _evicted(self, key: Hashable, place: int) -> None:
        assert isinstance(key, LoraFile)
        self.resident_files = self.resident_files - {key.path}
        log.info(
            "LoRA adapter %s evicted from place %d (least recently used, no busy slot held it)",
            key.path.stem,
            place,
        )

    def _read(self, key: LoraFile, place: int, started: float) -> None:
        try:
            layers = key.load()
            contents = {component: layout.place(layers) for component, layout in self._layouts.items()}
            done = _Finished(key, place, started, contents=contents)
        except AdapterError as error:
            done = _Finished(key, place, started, error=str(error))
        except (
            Exception
        ) as error:  # a file that vanished, a FUSE mount gone: the request fails, not the server
            done = _Finished(key, place, started, error=f"{type(error).__name__}: {error}")
        with self._lock:
            self._finished.append(done)
        self._wake()
