"""The step tables a server has built, kept so that the step loop builds each choice once.

A table is built on first use (microseconds for most; the jnp-computed ones compile their few ops once
per step count, ~0.1 s) and kept, padded to the engine's maximum step count. Explicit timesteps are
chosen by callers, so the book holds a bounded number of tables and forgets the least recently used.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from sdxl_server.engine.sampling.tables import SamplerTables, StepTable

_KEPT_TABLES = 512


@dataclasses.dataclass(frozen=True)
class SlotTables:
    """One request's tables as a slot holds them, padded to the engine's maximum step count."""

    num_steps: int
    timesteps: np.ndarray  # int32[max_steps]
    coefficients: np.ndarray  # float32[max_steps, len(update.COEFFICIENTS)]
    init_noise_sigma: float


class TableBook:
    def __init__(
        self, scheduler_config: Mapping[str, Any], alphas_cumprod: np.ndarray, max_steps: int
    ) -> None:
        self.max_steps = max_steps
        self.tables = SamplerTables(scheduler_config, alphas_cumprod)
        self._kept: collections.OrderedDict[tuple[Any, ...], SlotTables] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, sampler: str, spacing: str, steps: int, timesteps: Sequence[int] = ()) -> SlotTables:
        if not 1 <= steps <= self.max_steps:
            raise KeyError(steps)
        key = (sampler, spacing, steps, tuple(timesteps))
        with self._lock:
            kept = self._kept.get(key)
            if kept is not None:
                self._kept.move_to_end(key)
                return kept
        table: StepTable = self.tables.build(sampler, spacing, steps, timesteps)
        padded_timesteps, padded_coefficients = table.padded(self.max_steps)
        kept = SlotTables(table.num_steps, padded_timesteps, padded_coefficients, table.init_noise_sigma)
        with self._lock:
            self._kept[key] = kept
            while len(self._kept) > _KEPT_TABLES:
                self._kept.popitem(last=False)
        return kept
