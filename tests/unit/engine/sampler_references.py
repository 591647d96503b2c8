"""Numpy references for the samplers diffusers has no Flax scheduler of, each written from its published
update rule (sources named per function), and the tiny model's training schedule they run on.

Each reference is `(timesteps, init_noise_sigma, run)`: `run(latents, model, seed)` denoises the initial
latents (the noise times init_noise_sigma) with `model(unet_input, t) -> epsilon` and returns the final
latents. LCM's fresh noise is the engine's
contract (update.step_noise: each slot's own key folded with the step index), so the reference asks the
same function for it; everything else is numpy.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

TRAIN_STEPS = 1000
# The tiny model's (and SDXL's) betas: "scaled_linear" from 0.00085 to 0.012.
BETA_START, BETA_END = 0.00085, 0.012
TINY_CONFIG = {
    "num_train_timesteps": TRAIN_STEPS,
    "beta_start": BETA_START,
    "beta_end": BETA_END,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "trained_betas": None,
}

Model = Callable[[np.ndarray, int], np.ndarray]
Run = Callable[[np.ndarray, Model, int], np.ndarray]


def alphas_cumprod() -> np.ndarray:
    """float32[1000], from the Flax schedulers' common state (what the engine reads from the model)."""
    from diffusers import FlaxDDIMScheduler
    from diffusers.schedulers.scheduling_utils_flax import CommonSchedulerState

    return np.asarray(CommonSchedulerState.create(FlaxDDIMScheduler.from_config(TINY_CONFIG)).alphas_cumprod)


def euler_trailing(steps: int) -> tuple[np.ndarray, float, Run]:
    """Euler's method on the probability-flow ODE in sigma space (Karras et al. 2022, "Elucidating the
    Design Space of Diffusion-Based Generative Models", Algorithm 1 with S_churn = 0), on the "trailing"
    timesteps of Lin et al. 2024 ("Common Diffusion Noise Schedules and Sample Steps are Flawed", Table 2)
    as diffusers' EulerDiscreteScheduler spaces them: round(arange(1000, 0, -1000/steps)) - 1."""
    acp = alphas_cumprod().astype(np.float64)
    train_sigmas = np.sqrt((1 - acp) / acp)
    timesteps = np.round(np.arange(TRAIN_STEPS, 0, -TRAIN_STEPS / steps)) - 1
    sigmas = np.append(np.interp(timesteps, np.arange(TRAIN_STEPS), train_sigmas), 0.0)

    def run(x: np.ndarray, model: Model, seed: int) -> np.ndarray:
        for i, t in enumerate(timesteps):
            eps = model(x / np.sqrt(sigmas[i] ** 2 + 1), int(t))
            x = x + (sigmas[i + 1] - sigmas[i]) * eps  # d = (x - x0) / sigma = eps
        return x

    return timesteps.astype(np.int32), float(sigmas[0]), run  # starts at the largest sigma itself


def ddim(spacing: str, steps: int) -> tuple[np.ndarray, float, Run]:
    """Deterministic DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 12 with sigma 0),
    stepping from t to t - 1000 // steps as diffusers' DDIMScheduler does, with its timestep spacings
    ("trailing": round(arange(1000, 0, -1000/steps)) - 1; "linspace": round(linspace(0, 999, steps))
    reversed), x0 clipped to [-1, 1] (clip_sample, the class default the tiny config does not override),
    alpha_prod at t < 0 taken as 1 (set_alpha_to_one)."""
    acp = alphas_cumprod().astype(np.float64)
    if spacing == "trailing":
        timesteps = np.round(np.arange(TRAIN_STEPS, 0, -TRAIN_STEPS / steps)) - 1
    else:
        timesteps = np.linspace(0, TRAIN_STEPS - 1, steps).round()[::-1]
    stride = TRAIN_STEPS // steps

    def run(x: np.ndarray, model: Model, seed: int) -> np.ndarray:
        for t in timesteps.astype(int):
            eps = model(x, int(t))
            a, a_prev = acp[t], (acp[t - stride] if t - stride >= 0 else 1.0)
            x0 = np.clip((x - np.sqrt(1 - a) * eps) / np.sqrt(a), -1, 1)
            x = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * eps
        return x

    return timesteps.astype(np.int32), 1.0, run


def lcm(steps: int, explicit: tuple[int, ...] = ()) -> tuple[np.ndarray, float, Run]:
    """Multistep latent consistency sampling (Luo et al. 2023, "Latent Consistency Models", Algorithm 3):
    at each timestep the consistency function f(x, t) = c_skip(t) x + c_out(t) x0(x, t), with LCM's
    boundary-condition scalings c_skip = s^2 / ((10 t)^2 + s^2), c_out = 10 t / sqrt((10 t)^2 + s^2),
    s = 0.5, then re-noised to the next timestep with fresh noise: x = sqrt(a') f + sqrt(1 - a') z; the
    last step returns f. Timesteps: `steps` of the 50-step distillation schedule 999, 979, ..., 19 taken
    at evenly spaced indices (floor(linspace(0, 50, steps, endpoint=False))), or `explicit`."""
    import jax.numpy as jnp
    from sdxl_server.engine.sampling.update import step_noise

    acp = alphas_cumprod().astype(np.float64)
    if explicit:
        timesteps = np.asarray(explicit)
    else:
        origin = (np.arange(1, 51) * 20 - 1)[::-1]
        timesteps = origin[np.floor(np.linspace(0, 50, steps, endpoint=False)).astype(int)]

    def run(x: np.ndarray, model: Model, seed: int) -> np.ndarray:
        for i, t in enumerate(timesteps.astype(int)):
            eps = model(x, int(t))
            a = acp[t]
            x0 = (x - np.sqrt(1 - a) * eps) / np.sqrt(a)
            scaled = 10.0 * t
            c_skip = 0.25 / (scaled**2 + 0.25)
            c_out = scaled / np.sqrt(scaled**2 + 0.25)
            denoised = c_skip * x + c_out * x0
            if i == len(timesteps) - 1:
                return denoised
            a_next = acp[timesteps[i + 1]]
            # The slot's key is PRNGKey(seed), which keeps the seed's low 32 bits (as the engine's slot does).
            seeds, steps_done = jnp.array([seed % 2**32], jnp.uint32), jnp.array([i], jnp.int32)
            z = np.asarray(step_noise(seeds, steps_done, x.shape[1:]))
            x = np.sqrt(a_next) * denoised + np.sqrt(1 - a_next) * z
        return x

    return timesteps.astype(np.int32), 1.0, run
