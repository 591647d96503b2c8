"""One guided Euler denoising step over a block of slots: the arithmetic of the engine.

It follows `FlaxStableDiffusionXLPipeline._generate` and `FlaxEulerDiscreteScheduler` operation for
operation, so that one image equals the pipeline's (the engine's correctness oracle). Every slot carries its
own schedule table and step counter: slots at different steps share one call, and a slot that is done or
empty is left unchanged.

Classifier-free guidance pairs each slot's unconditional and conditional rows next to each other (stack on
a new axis, then reshape), so that the 2S UNet batch splits over devices exactly as the S slots do.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from sdxl_server.engine.api import Resolution
from sdxl_server.engine.models.loader import LoadedModel


class SlotState(NamedTuple):
    """Device arrays in the engine; the same structure also carries shapes and shardings to `jit`."""

    latents: Any  # float32[S, C, h/8, w/8]
    prompt_embeds: Any  # [S, 2, tokens, width]: (unconditional, conditional) per slot
    pooled: Any  # [S, 2, pooled width]
    guidance: Any  # float32[S]
    timesteps: Any  # int32[S, max_steps]
    sigmas: Any  # float32[S, max_steps]
    next_sigmas: Any  # float32[S, max_steps]
    num_steps: Any  # int32[S]; 0 marks a slot that holds no image
    step: Any  # int32[S]: steps done; the slot is active while step < num_steps


def onehot_pick(table: jax.Array, index: jax.Array) -> jax.Array:
    """table[s, index[s]] per slot, elementwise (exact: one term plus zeros), so it stays device-local."""
    hit = jnp.arange(table.shape[1])[None, :] == index[:, None]
    return jnp.where(hit, table, jnp.zeros_like(table)).sum(axis=1)


def per_slot(x: jax.Array, like: jax.Array) -> jax.Array:
    """A per-slot vector shaped to broadcast against `like` (slot axis first)."""
    return x.reshape(x.shape + (1,) * (like.ndim - 1))


def denoise_step(model: LoadedModel, resolution: Resolution, unet_params: Any, state: SlotState) -> SlotState:
    slots = state.latents.shape[0]
    index = jnp.minimum(state.step, state.timesteps.shape[1] - 1)
    t = onehot_pick(state.timesteps, index)
    sigma = onehot_pick(state.sigmas, index)
    next_sigma = onehot_pick(state.next_sigmas, index)
    latents = state.latents

    # FlaxEulerDiscreteScheduler.scale_model_input, then the CFG batch with each slot's pair adjacent.
    scaled = latents / per_slot((sigma**2 + 1) ** 0.5, latents)
    pair_shape = (2 * slots, *latents.shape[1:])
    model_input = jnp.stack([scaled, scaled], axis=1).reshape(pair_shape)
    timestep = jnp.stack([t, t], axis=1).reshape(2 * slots)
    embeds = state.prompt_embeds.reshape(2 * slots, *state.prompt_embeds.shape[2:])
    pooled = state.pooled.reshape(2 * slots, state.pooled.shape[2])
    h, w = resolution.height, resolution.width
    time_ids = jnp.broadcast_to(jnp.array([h, w, 0, 0, h, w], dtype=embeds.dtype), (2 * slots, 6))
    noise = model.pipeline.unet.apply(
        {"params": unet_params},
        model_input,
        timestep,
        encoder_hidden_states=embeds,
        added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
    ).sample
    noise = noise.reshape(slots, 2, *latents.shape[1:]).astype(jnp.float32)
    uncond, cond = noise[:, 0], noise[:, 1]
    guidance = per_slot(state.guidance, latents)
    noise_pred = uncond + guidance * (cond - uncond)

    # FlaxEulerDiscreteScheduler.step (epsilon prediction), written out the same way.
    sigma_b = per_slot(sigma, latents)
    pred_original = latents - sigma_b * noise_pred
    derivative = (latents - pred_original) / sigma_b
    dt = per_slot(next_sigma, latents) - sigma_b
    stepped = latents + derivative * dt

    active = state.step < state.num_steps
    new_latents = jnp.where(per_slot(active, latents), stepped, latents)
    return state._replace(latents=new_latents, step=state.step + active.astype(jnp.int32))


def denoise_steps(
    model: LoadedModel, resolution: Resolution, k: int, unet_params: Any, state: SlotState
) -> Any:
    """`k` steps in one program; returns the new (latents, step)."""
    if k == 1:
        out = denoise_step(model, resolution, unet_params, state)
    else:
        out = jax.lax.fori_loop(0, k, lambda _, s: denoise_step(model, resolution, unet_params, s), state)
    return out.latents, out.step


def decode_latents(model: LoadedModel, vae_params: Any, latents: jax.Array) -> jax.Array:
    """VAE decode to uint8 pixels [N, h, w, 3], cast on the device so that only uint8 crosses to the host."""
    vae = model.pipeline.vae
    latents = 1 / vae.config.scaling_factor * latents
    image = vae.apply({"params": vae_params}, latents, method=vae.decode).sample
    image = (image / 2 + 0.5).clip(0, 1).transpose(0, 2, 3, 1)
    return jnp.round(image * 255).astype(jnp.uint8)
