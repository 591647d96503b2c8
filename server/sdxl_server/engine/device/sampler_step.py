"""The sampler's part of a denoising step, on the device: one generic update driven by per-step tables.

Every slot carries a table of coefficients, one row per step and one column per name in `COEFFICIENTS`,
computed on the host when the request is admitted (noise_schedule.py). The device picks each slot's row
for its current step and applies the same arithmetic to every slot, so slots whose requests use
different samplers or step counts share one compiled step and none recompiles.

The seam for samplers beyond Euler: a sampler is a way to fill the table (host side), plus whatever the
update below needs to read from it. `history` is a latent-sized buffer per slot that the update may keep
from one step to the next (a multistep solver's last model output); `seed` (in the slot state) is the
slot's own key for samplers that draw fresh noise at each step. Today the table holds Euler's
(sigma, next sigma), and the update is `FlaxEulerDiscreteScheduler.step` written out operation for
operation, so that an image equals the Flax pipeline's.
"""

from __future__ import annotations

import jax

# Columns of a slot's per-step coefficient table (float32[max_steps, len(COEFFICIENTS)]).
COEFFICIENTS = ("sigma", "next_sigma")
_SIGMA, _NEXT_SIGMA = COEFFICIENTS.index("sigma"), COEFFICIENTS.index("next_sigma")


def _per_slot(x: jax.Array, like: jax.Array) -> jax.Array:
    return x.reshape(x.shape + (1,) * (like.ndim - 1))


def scale_model_input(coefficients: jax.Array, latents: jax.Array) -> jax.Array:
    """The UNet's input for each slot (`coefficients`: float32[S, len(COEFFICIENTS)], this step's row)."""
    sigma = coefficients[:, _SIGMA]
    return latents / _per_slot((sigma**2 + 1) ** 0.5, latents)  # FlaxEulerDiscreteScheduler's order


def update(
    coefficients: jax.Array, latents: jax.Array, model_output: jax.Array, history: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(next latents, next history) of every slot from its guided model output (epsilon prediction).

    The caller keeps the old values for slots that are not active this step."""
    sigma = _per_slot(coefficients[:, _SIGMA], latents)
    next_sigma = _per_slot(coefficients[:, _NEXT_SIGMA], latents)
    pred_original = latents - sigma * model_output
    derivative = (latents - pred_original) / sigma
    stepped = latents + derivative * (next_sigma - sigma)
    return stepped, history
