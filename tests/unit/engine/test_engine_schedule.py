"""The host-side schedule equals what FlaxEulerDiscreteScheduler itself uses at every step.

The scheduler's own functions reveal its sigmas: scale_model_input(ones) = 1 / sqrt(sigma^2 + 1) and
step(model_output=ones, sample=zeros) = next_sigma - sigma. Both spacings are checked: with "linspace"
the timesteps are fractional, the int32 timestep the pipeline passes matches nothing in the table, and
the scheduler falls back to index 0 (a quirk the engine must reproduce to equal the pipeline).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from sdxl_server.engine.device.noise_schedule import ScheduleBook


@pytest.mark.parametrize("spacing", ["leading", "linspace"])
def test_schedule_matches_the_scheduler(spacing):
    from diffusers import FlaxEulerDiscreteScheduler

    scheduler = FlaxEulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing=spacing
    )
    book = ScheduleBook(scheduler, scheduler.create_state(), max_steps=9)
    for steps in (1, 4, 9):
        state = scheduler.set_timesteps(scheduler.create_state(), num_inference_steps=steps, shape=())
        schedule = book.get(steps)
        assert schedule.init_noise_sigma == pytest.approx(float(state.init_noise_sigma), rel=1e-6)
        for i in range(steps):
            t = jnp.array(state.timesteps, dtype=jnp.int32)[i]  # what the pipeline feeds the UNet
            scale = float(scheduler.scale_model_input(state, jnp.ones(()), t))
            delta = float(scheduler.step(state, jnp.ones(()), t, jnp.zeros(())).prev_sample)
            sigma = np.float32(schedule.sigmas[i])
            assert schedule.timesteps[i] == int(t)
            assert scale == pytest.approx(1 / np.sqrt(sigma**2 + 1), rel=1e-6)
            assert delta == pytest.approx(float(schedule.next_sigmas[i] - sigma), rel=1e-5, abs=1e-6)
        assert not schedule.timesteps[steps:].any()  # padding beyond the request's steps


def test_leading_tables_replayed_in_numpy_equal_the_schedulers_bit_for_bit():
    """SDXL's "leading" schedule is computed in numpy (no per-length compile stalling the step loop)."""
    from diffusers import FlaxEulerDiscreteScheduler

    scheduler = FlaxEulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading"
    )
    state = scheduler.create_state()
    book = ScheduleBook(scheduler, state, max_steps=100)
    # Each set_timesteps call compiles (~0.5 s), so a spread of step counts rather than all of them.
    for steps in (1, 2, 3, 7, 9, 20, 25, 30, 50, 97, 100):
        expected = scheduler.set_timesteps(state, num_inference_steps=steps, shape=())
        timesteps, sigmas, init_noise_sigma = book._scheduler_tables(steps)
        np.testing.assert_array_equal(timesteps, np.asarray(expected.timesteps, np.float32))
        np.testing.assert_array_equal(sigmas, np.asarray(expected.sigmas, np.float32))
        assert init_noise_sigma == float(np.float32(expected.init_noise_sigma))
