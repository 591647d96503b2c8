"""The compiled device programs: encode, insert, step and decode, fixed shapes, one set per resolution.

All batch state lives on the device in a `SlotState` whose leading axis is the slot, sharded over the
mesh; parameters are replicated. Nothing in a step moves data between devices:

* classifier-free guidance pairs each slot's unconditional and conditional rows next to each other
  (stack on a new axis, then reshape), so the 2S UNet batch splits over the devices exactly as the S
  slots do (concatenating two halves of a sharded batch would make the partitioner shuffle rows);
* each slot carries its own schedule table and step counter, so a step needs no host-to-device copy,
  slots at different steps share one call, and finished or empty slots are simply left unchanged.

The arithmetic follows `FlaxStableDiffusionXLPipeline._generate` and `FlaxEulerDiscreteScheduler`
operation for operation, so one image equals the pipeline's (the engine's correctness oracle).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from sdxl_server.engine.api import Resolution
from sdxl_server.engine.mesh import replicated, slot_sharded
from sdxl_server.engine.model import LoadedModel
from sdxl_server.engine.program_cache import ProgramCache

# Two rows per encode call: the negative prompt (the unconditional row) and the prompt.
ENCODE_ROWS = 2


class SlotState(NamedTuple):
    """Device arrays in the engine; the same structure also carries shapes and shardings to `jit`."""

    latents: Any  # float32[S, C, h/8, w/8]
    prompt_embeds: Any  # [S, 2, tokens, width]: (unconditional, conditional) per slot
    pooled: Any  # [S, 2, pooled width]
    guidance: Any  # float32[S]
    timesteps: Any  # int32[S, max_steps]
    sigmas: Any  # float32[S, max_steps]
    next_sigmas: Any  # float32[S, max_steps]
    num_steps: Any  # int32[S]; 0 marks a slot that was never filled
    step: Any  # int32[S]: steps done; the slot is active while step < num_steps


class SlotUpdate(NamedTuple):
    """What `insert` writes into one slot (host values and the encode program's output)."""

    slot: Any  # int32 scalar
    seed: Any  # uint32 scalar: PRNGKey(seed) equals PRNGKey of the request's 64-bit seed + i
    prompt_embeds: Any  # [2, tokens, width] from encode
    pooled: Any  # [2, pooled width] from encode
    zero_negative: Any  # bool: an empty negative prompt means zero unconditional embeddings
    guidance: Any  # float32
    timesteps: Any  # int32[max_steps]
    sigmas: Any  # float32[max_steps]
    next_sigmas: Any  # float32[max_steps]
    num_steps: Any  # int32
    init_noise_sigma: Any  # float32


@dataclasses.dataclass
class ResolutionPrograms:
    resolution: Resolution
    insert: Any  # (SlotState, SlotUpdate) -> SlotState
    steps: dict[int, Any]  # k -> (unet params, SlotState) -> (latents, step) after k steps
    decode: Any  # (vae params, latents) -> uint8[S, h, w, 3]
    empty_state: SlotState


@dataclasses.dataclass
class ProgramSet:
    params: dict[str, Any]  # replicated on the mesh
    encode: Any  # (text encoder params, int32[2, 2, tokens]) -> (embeds[2, tokens, width], pooled[2, P])
    by_resolution: dict[Resolution, ResolutionPrograms]
    compile_seconds: float


def _onehot_pick(table: jax.Array, index: jax.Array) -> jax.Array:
    """table[s, index[s]] per slot, elementwise (exact: one term plus zeros), so it stays device-local."""
    hit = jnp.arange(table.shape[1])[None, :] == index[:, None]
    return jnp.where(hit, table, jnp.zeros_like(table)).sum(axis=1)


def _per_slot(x: jax.Array, like: jax.Array) -> jax.Array:
    return x.reshape(x.shape + (1,) * (like.ndim - 1))


def _denoise_step(
    model: LoadedModel, resolution: Resolution, unet_params: Any, state: SlotState
) -> SlotState:
    slots = state.latents.shape[0]
    index = jnp.minimum(state.step, state.timesteps.shape[1] - 1)
    t = _onehot_pick(state.timesteps, index)
    sigma = _onehot_pick(state.sigmas, index)
    next_sigma = _onehot_pick(state.next_sigmas, index)
    latents = state.latents

    # FlaxEulerDiscreteScheduler.scale_model_input, then the CFG batch with each slot's pair adjacent.
    scaled = latents / _per_slot((sigma**2 + 1) ** 0.5, latents)
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
    guidance = _per_slot(state.guidance, latents)
    noise_pred = uncond + guidance * (cond - uncond)

    # FlaxEulerDiscreteScheduler.step (epsilon prediction), written out the same way.
    sigma_b = _per_slot(sigma, latents)
    pred_original = latents - sigma_b * noise_pred
    derivative = (latents - pred_original) / sigma_b
    dt = _per_slot(next_sigma, latents) - sigma_b
    stepped = latents + derivative * dt

    active = state.step < state.num_steps
    new_latents = jnp.where(_per_slot(active, latents), stepped, latents)
    return state._replace(latents=new_latents, step=state.step + active.astype(jnp.int32))


def _steps(model: LoadedModel, resolution: Resolution, k: int, unet_params: Any, state: SlotState) -> Any:
    if k == 1:
        out = _denoise_step(model, resolution, unet_params, state)
    else:
        out = jax.lax.fori_loop(0, k, lambda _, s: _denoise_step(model, resolution, unet_params, s), state)
    return out.latents, out.step


def _insert(model: LoadedModel, resolution: Resolution, state: SlotState, update: SlotUpdate) -> SlotState:
    slots = state.latents.shape[0]
    here = jnp.arange(slots) == update.slot
    latent_shape = (
        1,
        model.latent_channels,
        resolution.height // model.vae_scale_factor,
        resolution.width // model.vae_scale_factor,
    )
    noise = jax.random.normal(jax.random.PRNGKey(update.seed), shape=latent_shape, dtype=jnp.float32)
    latents = (noise * update.init_noise_sigma)[0]
    uncond = jnp.where(update.zero_negative, jnp.zeros_like(update.prompt_embeds[0]), update.prompt_embeds[0])
    uncond_pooled = jnp.where(update.zero_negative, jnp.zeros_like(update.pooled[0]), update.pooled[0])
    embeds = jnp.stack([uncond, update.prompt_embeds[1]]).astype(state.prompt_embeds.dtype)
    pooled = jnp.stack([uncond_pooled, update.pooled[1]]).astype(state.pooled.dtype)

    def put(old: jax.Array, new: Any) -> jax.Array:
        new = jnp.asarray(new, dtype=old.dtype)
        return jnp.where(_per_slot(here, old), jnp.broadcast_to(new, old.shape), old)

    return SlotState(
        latents=put(state.latents, latents),
        prompt_embeds=put(state.prompt_embeds, embeds),
        pooled=put(state.pooled, pooled),
        guidance=put(state.guidance, update.guidance),
        timesteps=put(state.timesteps, update.timesteps),
        sigmas=put(state.sigmas, update.sigmas),
        next_sigmas=put(state.next_sigmas, update.next_sigmas),
        num_steps=put(state.num_steps, update.num_steps),
        step=put(state.step, 0),
    )


def _decode(model: LoadedModel, vae_params: Any, latents: jax.Array) -> jax.Array:
    vae = model.pipeline.vae
    latents = 1 / vae.config.scaling_factor * latents
    image = vae.apply({"params": vae_params}, latents, method=vae.decode).sample
    image = (image / 2 + 0.5).clip(0, 1).transpose(0, 2, 3, 1)
    # Cast on the device so that only uint8 crosses to the host.
    return jnp.round(image * 255).astype(jnp.uint8)


def _encode(model: LoadedModel, text_params: Any, token_ids: jax.Array) -> Any:
    return model.pipeline.get_embeddings(token_ids, text_params)


def build_programs(
    model: LoadedModel,
    mesh: Mesh,
    resolutions: tuple[Resolution, ...],
    slots: int,
    max_steps: int,
    steps_per_dispatch: tuple[int, ...],
    cache: ProgramCache | None = None,
) -> ProgramSet:
    """Places the parameters and compiles (or loads from `cache`) every program for every resolution."""
    rep, sharded = replicated(mesh), slot_sharded(mesh)
    params = jax.device_put(model.params, rep)
    text_params = {"text_encoder": params["text_encoder"], "text_encoder_2": params["text_encoder_2"]}
    compile_seconds = 0.0

    def compile_(name: str, fn: Any, in_shardings: Any, out_shardings: Any, *args: Any) -> Any:
        nonlocal compile_seconds
        started = time.perf_counter()

        def compile_program() -> Any:
            jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings)
            return jitted.lower(*args).compile()

        compiled = cache.get_or_compile(name, args, compile_program) if cache else compile_program()
        compile_seconds += time.perf_counter() - started
        return compiled

    token_spec = jax.ShapeDtypeStruct((ENCODE_ROWS, 2, model.max_tokens), jnp.int32, sharding=rep)
    encode = compile_("encode", functools.partial(_encode, model), (rep, rep), rep, text_params, token_spec)
    embeds_spec, pooled_spec = jax.eval_shape(functools.partial(_encode, model), text_params, token_spec)

    by_resolution = {}
    for resolution in resolutions:
        state = _empty_state(model, resolution, slots, max_steps, embeds_spec, pooled_spec, sharded)
        state_shardings = SlotState(*([sharded] * len(SlotState._fields)))
        update = SlotUpdate(
            slot=jax.ShapeDtypeStruct((), jnp.int32, sharding=rep),
            seed=jax.ShapeDtypeStruct((), jnp.uint32, sharding=rep),
            prompt_embeds=jax.ShapeDtypeStruct(embeds_spec.shape, embeds_spec.dtype, sharding=rep),
            pooled=jax.ShapeDtypeStruct(pooled_spec.shape, pooled_spec.dtype, sharding=rep),
            zero_negative=jax.ShapeDtypeStruct((), jnp.bool_, sharding=rep),
            guidance=jax.ShapeDtypeStruct((), jnp.float32, sharding=rep),
            timesteps=jax.ShapeDtypeStruct((max_steps,), jnp.int32, sharding=rep),
            sigmas=jax.ShapeDtypeStruct((max_steps,), jnp.float32, sharding=rep),
            next_sigmas=jax.ShapeDtypeStruct((max_steps,), jnp.float32, sharding=rep),
            num_steps=jax.ShapeDtypeStruct((), jnp.int32, sharding=rep),
            init_noise_sigma=jax.ShapeDtypeStruct((), jnp.float32, sharding=rep),
        )
        update_shardings = SlotUpdate(*([rep] * len(SlotUpdate._fields)))
        insert = compile_(
            f"insert-{resolution}",
            functools.partial(_insert, model, resolution),
            (state_shardings, update_shardings),
            state_shardings,
            state,
            update,
        )
        steps = {
            k: compile_(
                f"step{k}-{resolution}",
                functools.partial(_steps, model, resolution, k),
                (rep, state_shardings),
                (sharded, sharded),
                params["unet"],
                state,
            )
            for k in steps_per_dispatch
        }
        decode = compile_(
            f"decode-{resolution}",
            functools.partial(_decode, model),
            (rep, sharded),
            sharded,
            params["vae"],
            state.latents,
        )
        by_resolution[resolution] = ResolutionPrograms(resolution, insert, steps, decode, state)
    return ProgramSet(params, encode, by_resolution, compile_seconds)


def _empty_state(
    model: LoadedModel,
    resolution: Resolution,
    slots: int,
    max_steps: int,
    embeds_spec: Any,
    pooled_spec: Any,
    sharding: Any,
) -> SlotState:
    h, w = resolution.height // model.vae_scale_factor, resolution.width // model.vae_scale_factor
    zeros = functools.partial(jnp.zeros, device=sharding)
    return SlotState(
        latents=zeros((slots, model.latent_channels, h, w), jnp.float32),
        prompt_embeds=zeros((slots, 2, *embeds_spec.shape[1:]), embeds_spec.dtype),
        pooled=zeros((slots, 2, pooled_spec.shape[1]), pooled_spec.dtype),
        guidance=zeros((slots,), jnp.float32),
        timesteps=zeros((slots, max_steps), jnp.int32),
        sigmas=zeros((slots, max_steps), jnp.float32),
        next_sigmas=zeros((slots, max_steps), jnp.float32),
        num_steps=zeros((slots,), jnp.int32),
        step=zeros((slots,), jnp.int32),
    )
