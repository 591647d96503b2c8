"""The one sampler update the device runs for every slot, driven by the slot's row of its step table.

Every diffusers sampler served here is, per step, a linear combination of a few latent-sized terms with
coefficients that depend only on the step (tables.py computes them on the host):

    x0     = clip((x - noise_level * eps) / signal_level, clip)          the denoised estimate
    x_next = from_sample * x + from_slope * (x - x0) / noise_level + from_denoised * x0
             + from_model_output * eps + from_history * history + from_noise * noise
    history_next = x0

with the UNet fed x / sqrt(input_sigma^2 + 1). Euler is from_sample 1 and from_slope (next sigma - sigma),
which is FlaxEulerDiscreteScheduler.step operation for operation (a coefficient of 0 adds an exact 0);
DDIM mixes x0 and eps; DPM-Solver++ 2M mixes x, x0 and the previous step's x0 (the history); LCM mixes
x and x0 and adds fresh noise. Because the arithmetic is the same for all, slots with different samplers
share one compiled step.

Fresh noise comes from the slot's own key: normal(fold_in(PRNGKey(seed), step)) for the slot's step
index (PRNGKey(seed) itself drew the initial latents), so an image does not depend on its batch-mates.
It is drawn only when a slot in the block needs it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Columns of a step table (float32[steps, len(COEFFICIENTS)]); see the module docstring for their use.
COEFFICIENTS = (
    "input_sigma",
    "noise_level",
    "signal_level",
    "clip",
    "from_sample",
    "from_slope",
    "from_denoised",
    "from_model_output",
    "from_history",
    "from_noise",
)
(
    _INPUT_SIGMA,
    _NOISE_LEVEL,
    _SIGNAL_LEVEL,
    _CLIP,
    _FROM_SAMPLE,
    _FROM_SLOPE,
    _FROM_DENOISED,
    _FROM_MODEL_OUTPUT,
    _FROM_HISTORY,
    _FROM_NOISE,
) = range(len(COEFFICIENTS))


def _per_slot(x: jax.Array, like: jax.Array) -> jax.Array:
    return x.reshape(x.shape + (1,) * (like.ndim - 1))


def scale_model_input(coefficients: jax.Array, latents: jax.Array) -> jax.Array:
    """The UNet's input for each slot (`coefficients`: float32[S, len(COEFFICIENTS)], this step's row)."""
    sigma = _per_slot(coefficients[:, _INPUT_SIGMA], latents)
    return latents / ((sigma**2 + 1) ** 0.5)  # FlaxEulerDiscreteScheduler's order; 1 for the others


def step_noise(seed: jax.Array, step: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """float32[S, *shape]: each slot's fresh noise for its step `step` (uint32 seed, int32 step)."""

    def one(slot_seed: jax.Array, slot_step: jax.Array) -> jax.Array:
        key = jax.random.fold_in(jax.random.PRNGKey(slot_seed), slot_step)
        return jax.random.normal(key, shape, dtype=jnp.float32)

    return jax.vmap(one)(seed, step)


def update(
    coefficients: jax.Array,
    latents: jax.Array,
    model_output: jax.Array,
    history: jax.Array,
    seed: jax.Array,
    step: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """(next latents, next history) of every slot from its guided model output (epsilon prediction).

    The caller keeps the old values for slots that are not active this step."""

    def column(index: int) -> jax.Array:
        return _per_slot(coefficients[:, index], latents)

    noise_level = column(_NOISE_LEVEL)
    clip = column(_CLIP)
    denoised = jnp.clip((latents - noise_level * model_output) / column(_SIGNAL_LEVEL), -clip, clip)
    slope = (latents - denoised) / noise_level
    from_noise = coefficients[:, _FROM_NOISE]
    noise = jax.lax.cond(
        jnp.any(from_noise != 0),
        lambda: step_noise(seed, step, latents.shape[1:]),
        lambda: jnp.zeros_like(latents),
    )
    stepped = (
        column(_FROM_SAMPLE) * latents
        + column(_FROM_SLOPE) * slope
        + column(_FROM_DENOISED) * denoised
        + column(_FROM_MODEL_OUTPUT) * model_output
        + column(_FROM_HISTORY) * history
        + _per_slot(from_noise, latents) * noise
    )
    return stepped, denoised
