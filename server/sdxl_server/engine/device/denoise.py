"""One guided denoising step over a block of slots, in UNet rows: the arithmetic of the engine.

It follows `FlaxStableDiffusionXLPipeline._generate` operation for operation, so that one image equals
the pipeline's (the engine's correctness oracle); the sampler's part (input scaling and the update) is
engine/sampling/update.py's, the same arithmetic for every sampler. Every slot carries its own per-step
tables and step counter: slots at different steps or samplers share one call, and a slot that is done or
empty is left unchanged.

Rows, not slots: at each step a slot takes two UNet rows when it is guided (its unconditional and
conditional rows, next to each other) and one, the conditional row, when it is not (guidance <= 1, or
a step outside its guidance interval; batching/guidance_rows.py). The rows of a block's active slots are
packed in slot order at the front of a fixed-size row batch (the program's row bucket, chosen by the host
to cover them); the UNet runs on that batch only, and each slot reads its prediction back from its rows.
The layout is recomputed at every step on the device from the slots' own counters, so a k-step dispatch
stays right when a slot's guidance ends within it. Gathers use indices local to the block: nothing moves
between devices.
"""

from __future__ import annotations

import contextlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from sdxl_server.engine.adapters.row_deltas import row_adapters
from sdxl_server.engine.api import Resolution
from sdxl_server.engine.models.loader import LoadedModel
from sdxl_server.engine.sampling import update as sampler_update


class SlotState(NamedTuple):
    """Device arrays in the engine; the same structure also carries shapes and shardings to `jit`."""

    latents: Any  # float32[S, C, h/8, w/8]
    prompt_embeds: Any  # [S, 2, tokens, width]: (unconditional, conditional) per slot
    pooled: Any  # [S, 2, pooled width]
    guidance: Any  # float32[S]
    guided_from: Any  # int32[S]: steps guided_from <= i < guided_until run with guidance (two rows)
    guided_until: Any  # int32[S]
    timesteps: Any  # int32[S, max_steps]: what the UNet sees at step i
    coefficients: Any  # float32[S, max_steps, len(sampler_update.COEFFICIENTS)]: the sampler's table
    history: Any  # float32[S, C, h/8, w/8]: what the sampler keeps between steps (the previous x0)
    seed: Any  # uint32[S]: the slot's own key, for samplers that draw noise at each step
    num_steps: Any  # int32[S]; 0 marks a slot that holds no image
    step: Any  # int32[S]: steps done; the slot is active while step < num_steps
    # The slot's LoRA adapters (A = most per request; A = 0 without --lora-dir): the adapter bank's
    # places and the request's scales, a scale of 0 where it has fewer (engine/adapters/row_deltas.py).
    lora_places: Any  # int32[S, A]
    lora_scales: Any  # float32[S, A]


def onehot_pick(table: jax.Array, index: jax.Array) -> jax.Array:
    """table[s, index[s]] per slot, elementwise (exact: one term plus zeros), so it stays device-local."""
    hit = jnp.arange(table.shape[1])[None, :] == index[:, None]
    hit = hit.reshape(hit.shape + (1,) * (table.ndim - 2))
    return jnp.where(hit, table, jnp.zeros_like(table)).sum(axis=1)


def per_slot(x: jax.Array, like: jax.Array) -> jax.Array:
    """A per-slot vector shaped to broadcast against `like` (slot axis first)."""
    return x.reshape(x.shape + (1,) * (like.ndim - 1))


class RowLayout(NamedTuple):
    """Where each slot's rows sit in a row batch of fixed size (rows past the last slot's are padding)."""

    slot_of_row: jax.Array  # int32[R]: the slot a row belongs to (the last slot for padding rows)
    conditional: jax.Array  # bool[R]: the row reads the slot's conditional embeddings
    first_row: jax.Array  # int32[S]: the slot's first row (its unconditional row when guided)
    last_row: jax.Array  # int32[S]: the slot's last row (always its conditional row)


def row_layout(rows_per_slot: jax.Array, row_count: int) -> RowLayout:
    """Packs `rows_per_slot` (0, 1 or 2 each) in slot order into `row_count` rows."""
    slots = rows_per_slot.shape[0]
    ends = jnp.cumsum(rows_per_slot)
    starts = ends - rows_per_slot
    row = jnp.arange(row_count)
    slot_of_row = jnp.minimum((row[:, None] >= ends[None, :]).sum(axis=1), slots - 1)
    conditional = row - starts[slot_of_row] == rows_per_slot[slot_of_row] - 1
    return RowLayout(
        slot_of_row=slot_of_row,
        conditional=conditional,
        first_row=jnp.clip(starts, 0, row_count - 1),
        last_row=jnp.clip(ends - 1, 0, row_count - 1),
    )


def slot_rows(state: SlotState) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(active, guided, rows) of every slot at its current step: what guidance_rows.rows_at says."""
    active = state.step < state.num_steps
    guided = (state.step >= state.guided_from) & (state.step < state.guided_until)
    rows = jnp.where(active, 1 + guided.astype(jnp.int32), 0)
    return active, guided, rows


def denoise_step(
    model: LoadedModel,
    resolution: Resolution,
    row_count: int,
    unet_params: Any,
    state: SlotState,
    adapter_bank: Any = None,
) -> SlotState:
    """One step of every active slot. With `adapter_bank` (the UNet's, device_bank.py), each row adds
    the low-rank deltas of its slot's adapters; without it the UNet is the base one, unchanged."""
    index = jnp.minimum(state.step, state.timesteps.shape[1] - 1)
    t = onehot_pick(state.timesteps, index)
    coefficients = onehot_pick(state.coefficients, index)
    latents = state.latents
    active, guided, rows = slot_rows(state)
    layout = row_layout(rows, row_count)
    source, conditional = layout.slot_of_row, layout.conditional.astype(jnp.int32)

    scaled = sampler_update.scale_model_input(coefficients, latents)
    embeds = state.prompt_embeds[source, conditional]
    pooled = state.pooled[source, conditional]
    h, w = resolution.height, resolution.width
    time_ids = jnp.broadcast_to(jnp.array([h, w, 0, 0, h, w], dtype=embeds.dtype), (row_count, 6))
    with _row_adapters(adapter_bank, state, source):
        prediction = model.pipeline.unet.apply(
            {"params": unet_params},
            scaled[source],
            t[source],
            encoder_hidden_states=embeds,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
        ).sample.astype(jnp.float32)
    cond = prediction[layout.last_row]
    uncond = prediction[layout.first_row]
    guidance = per_slot(state.guidance, latents)
    guided_prediction = uncond + guidance * (cond - uncond)
    model_output = jnp.where(per_slot(guided, latents), guided_prediction, cond)

    stepped, history = sampler_update.update(
        coefficients, latents, model_output, state.history, state.seed, state.step
    )
    keep = per_slot(active, latents)
    return state._replace(
        latents=jnp.where(keep, stepped, latents),
        history=jnp.where(keep, history, state.history),
        step=state.step + active.astype(jnp.int32),
    )


def _row_adapters(adapter_bank: Any, state: SlotState, source: jax.Array) -> Any:
    """Both rows of a guided slot (and its one row otherwise) take the slot's adapters."""
    if adapter_bank is None:
        return contextlib.nullcontext()
    return row_adapters(adapter_bank, state.lora_places[source], state.lora_scales[source])


def denoise_steps(
    model: LoadedModel,
    resolution: Resolution,
    k: int,
    row_count: int,
    unet_params: Any,
    state: SlotState,
    adapter_bank: Any = None,
) -> Any:
    """`k` steps in one program, each over `row_count` UNet rows; returns the new (latents, history,
    step).

    A step whose block has no active slot skips the UNet: it would leave every slot as it was anyway.
    The row bucket is the busiest device's (one SPMD program), so without the skip a device with no
    image would run a whole bucket of padding at each step, as would a block whose last image ended
    within a k-step dispatch. Where the devices share a host's cores (this CPU), that padding is cores
    taken from the busy device; on a TPU the idle chip waits instead of computing nothing."""

    def step(current: SlotState) -> SlotState:
        return denoise_step(model, resolution, row_count, unet_params, current, adapter_bank)

    def one(_: Any, current: SlotState) -> SlotState:
        active, _guided, _rows = slot_rows(current)
        return jax.lax.cond(jnp.any(active), step, lambda unchanged: unchanged, current)

    out = one(0, state) if k == 1 else jax.lax.fori_loop(0, k, one, state)
    return out.latents, out.history, out.step


def decode_latents(model: LoadedModel, vae_params: Any, latents: jax.Array) -> jax.Array:
    """VAE decode to uint8 pixels [N, h, w, 3], cast on the device so that only uint8 crosses to the host."""
    vae = model.pipeline.vae
    latents = 1 / vae.config.scaling_factor * latents
    image = vae.apply({"params": vae_params}, latents, method=vae.decode).sample
    image = (image / 2 + 0.5).clip(0, 1).transpose(0, 2, 3, 1)
    return jnp.round(image * 255).astype(jnp.uint8)
