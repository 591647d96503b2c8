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

from sdxl_server.engine.device.sampler_step import COEFFICIENTS


@dataclasses.dataclass(frozen=True)
class StepSchedule:
    """The schedule of one request with `num_steps` steps, padded to the engine's maximum."""

    num_steps: int
    timesteps: np.ndarray  # int32[max_steps]: what the UNet sees at step i
    sigmas: np.ndarray  # float32[max_steps]: sigma of step i
    next_sigmas: np.ndarray  # float32[max_steps]: sigma the Euler update moves to
    init_noise_sigma: float  # float32 value the initial latents are scaled by

    @property
    def coefficients(self) -> np.ndarray:
        """float32[max_steps, len(COEFFICIENTS)]: the table the device's sampler update reads."""
        columns = {"sigma": self.sigmas, "next_sigma": self.next_sigmas}
        return np.stack([columns[name] for name in COEFFICIENTS], axis=1).astype(np.float32)


class ScheduleBook:
    """The schedule of each step count, computed on first use with numpy and kept.

    `set_timesteps` compiles its jnp ops anew for every length (~0.5 s on a CPU), which would stall the
    step loop whenever a request brings a new step count. For "leading" spacing (SDXL's) its arithmetic is
    replayed in numpy instead, in microseconds: the timesteps are whole numbers, so the replay gives the
    same bits (test_engine_schedule.py checks a spread of 1..100 steps; near 1000 steps a sigma can
    differ in its last float32 bit, far below what an image shows).
    "linspace" timesteps are fractions whose last bit depends on XLA's float32 division, so that spacing
    still asks the scheduler.
    """

    def __init__(self, scheduler: Any, scheduler_state: Any, max_steps: int) -> None:
        self.max_steps = max_steps
        self._scheduler = scheduler
        self._scheduler_state = scheduler_state
        self._spacing = scheduler.config.timestep_spacing
        self._train_steps = int(scheduler.config.num_train_timesteps)
        alphas_cumprod = np.asarray(scheduler_state.common.alphas_cumprod, np.float32)
        self._train_sigmas = (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).astype(np.float32)
        self._schedules: dict[int, StepSchedule] = {}
        self._lock = threading.Lock()

    def get(self, num_steps: int) -> StepSchedule:
        if not 1 <= num_steps <= self.max_steps:
            raise KeyError(num_steps)
        with self._lock:
            schedule = self._schedules.get(num_steps)
            if schedule is None:
                schedule = self._build(num_steps)
                self._schedules[num_steps] = schedule
            return schedule

    def _scheduler_tables(self, num_steps: int) -> tuple[np.ndarray, np.ndarray, float]:
        """(timesteps, sigmas with a final 0, init noise sigma) as `set_timesteps` makes them."""
        if self._spacing != "leading":
            state = self._scheduler.set_timesteps(
                self._scheduler_state, num_inference_steps=num_steps, shape=()
            )
            return (
                np.asarray(state.timesteps, np.float32),
                np.asarray(state.sigmas, np.float32),
                float(np.float32(state.init_noise_sigma)),
            )
        # The scheduler's own +1 (it has no steps_offset argument).
        step_ratio = self._train_steps // num_steps
        timesteps = (np.arange(0, num_steps) * step_ratio).round()[::-1].astype(np.float32) + 1
        train_indices = np.arange(0, len(self._train_sigmas), dtype=np.float32)
        sigmas = np.interp(timesteps, train_indices, self._train_sigmas).astype(np.float32)
        sigmas = np.concatenate([sigmas, np.zeros(1, np.float32)])
        init_noise_sigma = np.float32((np.float32(sigmas.max()) ** 2 + 1) ** 0.5)
        return timesteps, sigmas, float(init_noise_sigma)

    def _build(self, num_steps: int) -> StepSchedule:
        table_timesteps, table_sigmas, init_noise_sigma = self._scheduler_tables(num_steps)
        timesteps = np.zeros(self.max_steps, np.int32)
        sigmas = np.zeros(self.max_steps, np.float32)
        next_sigmas = np.zeros(self.max_steps, np.float32)
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
            init_noise_sigma=init_noise_sigma,
        )
