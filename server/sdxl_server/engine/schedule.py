"""Per-request Euler schedules, computed on the host exactly as the Flax pipeline computes them.

`FlaxStableDiffusionXLPipeline` asks `FlaxEulerDiscreteScheduler.set_timesteps` for the schedule, feeds
the UNet the timestep cast to int32, and the scheduler then looks that int32 timestep up again in its float
table (`jnp.where(timesteps == t, size=1)`, falling back to index 0 when nothing matches). We replay that
lookup here, so that each step's (timestep, sigma, next sigma) is exactly what the pipeline uses, and the
device only indexes a table: any number of steps up to the maximum runs without recompiling.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class StepSchedule:
    """The schedule of one request with `num_steps` steps, padded to the engine's maximum."""

    num_steps: int
    timesteps: np.ndarray  # int32[max_steps]: what the UNet sees at step i
    sigmas: np.ndarray  # float32[max_steps]: sigma of step i
    next_sigmas: np.ndarray  # float32[max_steps]: sigma the Euler update moves to
    init_noise_sigma: float  # float32 value the initial latents are scaled by


class ScheduleBook:
    """The schedule of each step count, built on first use and kept.

    Built lazily because each build costs ~0.5 s on a CPU (`set_timesteps` compiles its jnp ops anew for
    every length): building all of 1..max_steps up front made start-up grow by minutes with max_steps.
    """

    def __init__(self, scheduler: Any, scheduler_state: Any, max_steps: int) -> None:
        self.max_steps = max_steps
        self._scheduler = scheduler
        self._scheduler_state = scheduler_state
        self._schedules: dict[int, StepSchedule] = {}
        self._lock = threading.Lock()

    def get(self, num_steps: int) -> StepSchedule:
        if not 1 <= num_steps <= self.max_steps:
            raise KeyError(num_steps)
        with self._lock:
            schedule = self._schedules.get(num_steps)
            if schedule is None:
                schedule = _build(self._scheduler, self._scheduler_state, num_steps, self.max_steps)
                self._schedules[num_steps] = schedule
            return schedule


def _build(scheduler: Any, scheduler_state: Any, num_steps: int, max_steps: int) -> StepSchedule:
    state = scheduler.set_timesteps(scheduler_state, num_inference_steps=num_steps, shape=())
    table_timesteps = np.asarray(state.timesteps, dtype=np.float32)
    table_sigmas = np.asarray(state.sigmas, dtype=np.float32)
    timesteps = np.zeros(max_steps, np.int32)
    sigmas = np.zeros(max_steps, np.float32)
    next_sigmas = np.zeros(max_steps, np.float32)
    for i in range(num_steps):
        t = np.int32(table_timesteps[i])  # the pipeline's jnp.array(timesteps, dtype=int32)[i]
        matches = np.nonzero(table_timesteps == np.float32(t))[0]
        index = int(matches[0]) if matches.size else 0
        timesteps[i] = t
        sigmas[i] = table_sigmas[index]
        next_sigmas[i] = table_sigmas[index + 1]
    return StepSchedule(
        num_steps=num_steps,
        timesteps=timesteps,
        sigmas=sigmas,
        next_sigmas=next_sigmas,
        init_noise_sigma=float(np.float32(state.init_noise_sigma)),
    )
