"""The compiled device programs, fixed shapes, one set per served resolution.

State lives on the device, its leading axis the slot, sharded over the mesh: device d holds the block of
slots [d*P, (d+1)*P) (P slots per device). The step loop keeps each block's busy slots packed at its front,
so that every per-device program works on a prefix of its own block:

* `insert`: writes one slot (its initial noise, embeddings, guidance and per-step tables);
* `steps[(k, r)]`: k denoising steps of every block's busy slots, their UNet rows packed into r rows
  (r a row bucket, buckets.py: one row per unguided image, two per guided one; denoise.py);
* `adapter_steps[(k, r, w)]` (with an adapter bank, `--lora-dir`): the same steps, taking the UNet's
  LoRA adapter bank as an argument, each row adding the deltas of its slot's first w adapters. The step
  loop runs them only while a busy slot has an adapter, so a batch without one costs what it did
  before, and the narrowest w that covers every busy slot's adapters (`adapter_widths`: 1 and
  `--max-loras-per-request`), so a batch whose requests name one adapter each computes one delta a row;
* `encode_with_adapters` (likewise): `encode` with one request's adapters applied to both text
  encoders, from their own banks (used only for a request whose adapters change a text encoder);
* `rearrange`: within each block, copies finished latents into the block's held-latents buffer and
  permutes the slots so that the busy ones come first again (a gather with local indices);
* `decode[b]`: the VAE over up to b held latents of every block from a given row (the same on every
  device), uint8 pixels out; each device decodes only its own count of rows (an int32 per device), in
  the smallest decode batch that holds them, and none when it has none. b is at most the decode batch
  (`max_decode_batch`): more held images are decoded in several calls, since the decode's activations,
  not the step's, are what fills a TPU at 1024x1024.

The per-device programs are `shard_map`s: each device computes on its own block and nothing in them moves
data between devices (tests check the compiled step and decode for collectives).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from sdxl_server.engine.adapters.adapter_bank import BankLayout
from sdxl_server.engine.adapters.device_bank import empty_device_bank
from sdxl_server.engine.adapters.row_deltas import row_adapters
from sdxl_server.engine.api import Resolution
from sdxl_server.engine.batching.buckets import bucket_sizes, row_bucket_sizes, rows_per_device
from sdxl_server.engine.device.denoise import SlotState, decode_latents, denoise_steps, per_slot
from sdxl_server.engine.device.flax_parameters import parameters_as_loaded
from sdxl_server.engine.device.mesh import DATA_AXIS, replicated, slot_sharded
from sdxl_server.engine.device.program_cache import ProgramCache
from sdxl_server.engine.models.loader import LoadedModel
from sdxl_server.engine.sampling import update as sampler_update

# Two rows per encode call: the negative prompt (the unconditional row) and the prompt.
ENCODE_ROWS = 2

_BLOCK = PartitionSpec(DATA_AXIS)  # each device's own block of the leading axis
_WHOLE = PartitionSpec()  # replicated


class SlotUpdate(NamedTuple):
    """What `insert` writes into one slot (host values and the encode program's output)."""

    slot: Any  # int32 scalar
    seed: Any  # uint32 scalar: PRNGKey(seed) equals PRNGKey of the request's 64-bit seed + i
    prompt_embeds: Any  # [2, tokens, width] from encode
    pooled: Any  # [2, pooled width] from encode
    zero_negative: Any  # bool: an empty negative prompt means zero unconditional embeddings
    guidance: Any  # float32
    guided_from: Any  # int32: the first guided step (guidance_rows.guided_steps)
    guided_until: Any  # int32: the step after the last guided one
    timesteps: Any  # int32[max_steps]
    coefficients: Any  # float32[max_steps, len(sampler_update.COEFFICIENTS)]
    num_steps: Any  # int32
    init_noise_sigma: Any  # float32
    lora_places: Any  # int32[A]: the adapter bank's places of the request's adapters (0 past them)
    lora_scales: Any  # float32[A]: their scales (0 past them: no change)


class Rearrangement(NamedTuple):
    """Host-built indices for `rearrange`, local to each block (values in 0..P-1), sharded like the slots."""

    order: Any  # int32[S]: new position i of a block takes the slot at order[i]
    live: Any  # bool[S]: False where the new position holds no image (its num_steps becomes 0)
    held_source: Any  # int32[D*P]: held row r of a block takes the latents of slot held_source[r] ...
    held_take: Any  # bool[D*P]: ... where held_take[r]


class Bank(NamedTuple):
    """One resolution's device state: the slots and the finished latents waiting for a decode."""

    slots: SlotState
    held: Any  # float32[D*P, C, h/8, w/8]


@dataclasses.dataclass
class ResolutionPrograms:
    resolution: Resolution
    buckets: tuple[int, ...]  # per-device decode batch sizes compiled (images)
    row_buckets: tuple[int, ...]  # per-device UNet row counts of the step programs
    insert: Any  # (SlotState, SlotUpdate) -> SlotState
    steps: dict[tuple[int, int], Any]  # (k, rows) -> (unet params, SlotState) -> (latents, history, step)
    rearrange: Any  # (Bank, Rearrangement) -> Bank
    decode: dict[int, Any]  # b -> (vae params, held, int32 first row) -> uint8[D*b, h, w, 3]
    empty_bank: Bank
    # (k, rows, width) -> (unet params, UNet adapter bank, SlotState) -> as `steps`, applying each slot's
    # first `width` adapters (adapter_widths); empty without a bank.
    adapter_steps: dict[tuple[int, int, int], Any] = dataclasses.field(default_factory=dict)

    def adapter_step(self, k: int, rows: int, stacked: int) -> tuple[int, Any]:
        """(width, program): the narrowest adapter step program that applies `stacked` adapters a slot."""
        width = min(w for kk, r, w in self.adapter_steps if kk == k and r == rows and w >= stacked)
        return width, self.adapter_steps[(k, rows, width)]


def adapter_widths(loras_per_request: int) -> tuple[int, ...]:
    """The stack widths the adapter step is compiled for: one adapter a slot (the common request, at the
    price of one delta a row) and the most a request may name (every delta a slot carries)."""
    return tuple(sorted({min(1, loras_per_request), loras_per_request}))


@dataclasses.dataclass
class ProgramSet:
    params: dict[str, Any]  # replicated on the mesh
    encode: Any  # (text encoder params, int32[2, 2, tokens]) -> (embeds[2, tokens, width], pooled[2, P])
    by_resolution: dict[Resolution, ResolutionPrograms]
    compile_seconds: float
    programs_compiled: int  # programs built at start (compiled, or loaded from the cache directory)
    # The LoRA adapter banks by component ("unet", "text_encoder", "text_encoder_2"), every place empty,
    # replicated (device_bank.py); empty without --lora-dir.
    adapter_banks: dict[str, Any] = dataclasses.field(default_factory=dict)
    # (text encoder params, {encoder: bank}, int32[A] places, float32[A] scales, token ids) -> as `encode`
    encode_with_adapters: Any = None


def _steps_of_block(
    model: LoadedModel, resolution: Resolution, k: int, rows: int, unet_params: Any, block: SlotState
) -> Any:
    """One device's block: k steps of its busy slots over `rows` UNet rows (idle slots stay as they
    were: their rows are zero, and the per-slot arithmetic beside the UNet is negligible)."""
    return denoise_steps(model, resolution, k, rows, unet_params, block)


def _adapter_steps_of_block(
    model: LoadedModel,
    resolution: Resolution,
    k: int,
    rows: int,
    width: int,
    unet_params: Any,
    adapter_bank: Any,
    block: SlotState,
) -> Any:
    """`_steps_of_block` with each row's first `width` LoRA adapters from the (replicated) bank: the
    slots keep their full stack, and a narrow program reads its first columns (its caller knows that no
    busy slot has more)."""
    narrow = block._replace(
        lora_places=block.lora_places[:, :width], lora_scales=block.lora_scales[:, :width]
    )
    return denoise_steps(model, resolution, k, rows, unet_params, narrow, adapter_bank)


def _rearrange(bank: Bank, plan: Rearrangement) -> Bank:
    """One device's block: finished latents into the held rows first (from their current slots), then the
    slots permuted so that busy ones are packed at the front."""
    slots = bank.slots
    stashed = slots.latents[plan.held_source]
    held = jnp.where(per_slot(plan.held_take, bank.held), stashed, bank.held)
    moved = SlotState(*(field[plan.order] for field in slots))
    moved = moved._replace(num_steps=jnp.where(plan.live, moved.num_steps, 0))
    return Bank(moved, held)


def _decode_rows(
    model: LoadedModel,
    sizes: tuple[int, ...],
    vae_params: Any,
    held: jax.Array,
    first: jax.Array,
    count: jax.Array,
) -> jax.Array:
    """Rows first .. first+count-1 of one device's held latents, where `count` (int32[1]) is this
    device's own: the VAE runs on the smallest of `sizes` (the decode batches up to this program's,
    sizes[-1]) that holds them, or not at all for 0, and the rows past them come back as zeros.

    Why per device: the devices' held counts differ whenever their images finish at different steps
    (staggered entries: under saturation one device finishes two images at a boundary, another one, and
    the next boundary the other way round). Decoding the busiest device's count everywhere made the
    others run the VAE on padding: with 2 slots a device, six decoded rows for every four images. Each
    device's branch is its own (a `switch` inside the `shard_map`, no collective), so a device with
    less to decode is free for its next step sooner. The host keeps first + sizes[-1] within the block:
    a dynamic slice would otherwise clamp `first` and decode other rows."""
    batch = sizes[-1]
    out_shape = jax.eval_shape(
        functools.partial(decode_latents, model),
        vae_params,
        jax.ShapeDtypeStruct((batch, *held.shape[1:]), held.dtype),
    )

    def nothing(_: Any, __: Any) -> jax.Array:
        return jnp.zeros(out_shape.shape, out_shape.dtype)

    def rows(size: int) -> Callable[[Any, Any], jax.Array]:
        def decode(params: Any, start: Any) -> jax.Array:
            pixels = decode_latents(model, params, jax.lax.dynamic_slice_in_dim(held, start, size, axis=0))
            return jnp.pad(pixels, ((0, batch - size), (0, 0), (0, 0), (0, 0)))

        return decode

    needed = count[0]
    # 0 for nothing, else 1 + the index of the smallest size that holds `needed`
    branch = jnp.where(needed > 0, 1 + jnp.sum(jnp.asarray(sizes) < needed), 0)
    return jax.lax.switch(branch, [nothing, *(rows(size) for size in sizes)], vae_params, first)


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
        return jnp.where(per_slot(here, old), jnp.broadcast_to(new, old.shape), old)

    return SlotState(
        latents=put(state.latents, latents),
        prompt_embeds=put(state.prompt_embeds, embeds),
        pooled=put(state.pooled, pooled),
        guidance=put(state.guidance, update.guidance),
        guided_from=put(state.guided_from, update.guided_from),
        guided_until=put(state.guided_until, update.guided_until),
        timesteps=put(state.timesteps, update.timesteps),
        coefficients=put(state.coefficients, update.coefficients),
        history=put(state.history, 0.0),
        seed=put(state.seed, update.seed),
        num_steps=put(state.num_steps, update.num_steps),
        step=put(state.step, 0),
        lora_places=put(state.lora_places, update.lora_places),
        lora_scales=put(state.lora_scales, update.lora_scales),
    )


def _encode(model: LoadedModel, text_params: Any, token_ids: jax.Array) -> Any:
    return model.pipeline.get_embeddings(token_ids, text_params)


def _encode_with_adapters(
    model: LoadedModel,
    text_params: Any,
    banks: Any,
    places: jax.Array,
    scales: jax.Array,
    token_ids: jax.Array,
) -> Any:
    """`get_embeddings` (diffusers' SDXL pipeline), each encoder under its own bank: both CLIP encoders
    name their layers alike, so one interception over both could not tell their factors apart."""
    pipeline = model.pipeline
    rows = token_ids.shape[0]
    row_places = jnp.broadcast_to(places, (rows, places.shape[0]))
    row_scales = jnp.broadcast_to(scales, (rows, scales.shape[0]))
    with row_adapters(banks["text_encoder"], row_places, row_scales):
        first = pipeline.text_encoder(
            token_ids[:, 0, :], params=text_params["text_encoder"], output_hidden_states=True
        )
    with row_adapters(banks["text_encoder_2"], row_places, row_scales):
        second = pipeline.text_encoder_2(
            token_ids[:, 1, :], params=text_params["text_encoder_2"], output_hidden_states=True
        )
    embeds = jnp.concatenate([first["hidden_states"][-2], second["hidden_states"][-2]], axis=-1)
    return embeds, second["text_embeds"]


def _per_device(mesh: Mesh, fn: Any, in_specs: Any, out_specs: Any) -> Any:
    # check_vma off: the UNet's Flax code mixes replicated and per-device values in ways the checker
    # cannot type; the in/out specs still say exactly which arrays are per device.
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


@parameters_as_loaded()
def build_programs(
    model: LoadedModel,
    mesh: Mesh,
    resolutions: tuple[Resolution, ...],
    slots_per_device: int,
    max_steps: int,
    steps_per_dispatch: tuple[int, ...],
    cache: ProgramCache | None = None,
    on_compiled: Callable[[str, Any, float], None] | None = None,
    decode_batch: int | None = None,
    adapter_layouts: Mapping[str, BankLayout] | None = None,
    loras_per_request: int = 0,
) -> ProgramSet:
    """Places the parameters and compiles (or loads from `cache`) every program for every resolution.

    With abstract parameters (`jax.ShapeDtypeStruct` leaves, as `sdxl-server compile` passes for a TPU
    topology that is not attached) nothing is placed or allocated: the same programs are compiled from
    shapes alone, for the mesh's devices, and the returned set's params and empty banks are shapes too.
    `on_compiled(name, program, seconds)` sees each program as it is built. `decode_batch`: the most
    images one decode call takes per device (default: the slots per device). `adapter_layouts`: the
    LoRA adapter banks of the UNet and both text encoders (with `loras_per_request` adapters per
    slot), for which `adapter_steps` and `encode_with_adapters` are compiled beside `steps` and
    `encode`; None: no per-request adapters, and no slot carries any."""
    rep, sharded = replicated(mesh), slot_sharded(mesh)
    slots = rows_per_device(slots_per_device) * mesh.size  # 2P a device: P guided or 2P unguided images
    buckets = bucket_sizes(min(decode_batch or slots_per_device, slots_per_device))
    row_buckets = row_bucket_sizes(slots_per_device)
    abstract = is_abstract(model.params)
    params = _abstract_on(model.params, rep) if abstract else jax.device_put(model.params, rep)
    text_params = {"text_encoder": params["text_encoder"], "text_encoder_2": params["text_encoder_2"]}
    compile_seconds = 0.0
    compiled_count = 0

    def compile_(name: str, fn: Any, in_shardings: Any, out_shardings: Any, *args: Any) -> Any:
        nonlocal compile_seconds, compiled_count
        started = time.perf_counter()

        def compile_program() -> Any:
            jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings)
            return jitted.lower(*args).compile()

        compiled = cache.get_or_compile(name, args, compile_program) if cache else compile_program()
        seconds = time.perf_counter() - started
        compile_seconds += seconds
        compiled_count += 1
        if on_compiled is not None:
            on_compiled(name, compiled, seconds)
        return compiled

    token_spec = jax.ShapeDtypeStruct((ENCODE_ROWS, 2, model.max_tokens), jnp.int32, sharding=rep)
    encode = compile_("encode", functools.partial(_encode, model), (rep, rep), rep, text_params, token_spec)
    embeds_spec, pooled_spec = jax.eval_shape(functools.partial(_encode, model), text_params, token_spec)
    loras = loras_per_request if adapter_layouts else 0
    adapter_banks: dict[str, Any] = {}
    for component, layout in (adapter_layouts or {}).items():
        dtype = jax.tree_util.tree_leaves(params[component])[0].dtype
        if abstract:  # shapes only: SDXL's banks are gigabytes that a compile for a topology never fills
            adapter_banks[component] = {
                module: tuple(jax.ShapeDtypeStruct(shape, dtype, sharding=rep) for shape in pair)
                for module, pair in layout.array_shapes().items()
            }
        else:
            adapter_banks[component] = empty_device_bank(layout, dtype, rep)
    adapter_bank = adapter_banks.get("unet")
    encode_with_adapters = None
    if adapter_banks:
        text_banks = {c: adapter_banks[c] for c in ("text_encoder", "text_encoder_2")}
        encode_with_adapters = compile_(
            "encode-lora",
            functools.partial(_encode_with_adapters, model),
            (rep, rep, rep, rep, rep),
            rep,
            text_params,
            text_banks,
            jax.ShapeDtypeStruct((loras,), jnp.int32, sharding=rep),
            jax.ShapeDtypeStruct((loras,), jnp.float32, sharding=rep),
            token_spec,
        )

    by_resolution = {}
    for resolution in resolutions:
        bank_shapes = _bank_shapes(model, resolution, slots, max_steps, embeds_spec, pooled_spec, loras)
        bank = _abstract_on(bank_shapes, sharded) if abstract else _zeros_on(bank_shapes, sharded)
        state = bank.slots
        state_shardings = SlotState(*([sharded] * len(SlotState._fields)))
        bank_shardings = Bank(state_shardings, sharded)
        block_specs = SlotState(*([_BLOCK] * len(SlotState._fields)))
        update = SlotUpdate(
            slot=jax.ShapeDtypeStruct((), jnp.int32, sharding=rep),
            seed=jax.ShapeDtypeStruct((), jnp.uint32, sharding=rep),
            prompt_embeds=jax.ShapeDtypeStruct(embeds_spec.shape, embeds_spec.dtype, sharding=rep),
            pooled=jax.ShapeDtypeStruct(pooled_spec.shape, pooled_spec.dtype, sharding=rep),
            zero_negative=jax.ShapeDtypeStruct((), jnp.bool_, sharding=rep),
            guidance=jax.ShapeDtypeStruct((), jnp.float32, sharding=rep),
            guided_from=jax.ShapeDtypeStruct((), jnp.int32, sharding=rep),
            guided_until=jax.ShapeDtypeStruct((), jnp.int32, sharding=rep),
            timesteps=jax.ShapeDtypeStruct((max_steps,), jnp.int32, sharding=rep),
            coefficients=jax.ShapeDtypeStruct(
                (max_steps, len(sampler_update.COEFFICIENTS)), jnp.float32, sharding=rep
            ),
            num_steps=jax.ShapeDtypeStruct((), jnp.int32, sharding=rep),
            init_noise_sigma=jax.ShapeDtypeStruct((), jnp.float32, sharding=rep),
            lora_places=jax.ShapeDtypeStruct((loras,), jnp.int32, sharding=rep),
            lora_scales=jax.ShapeDtypeStruct((loras,), jnp.float32, sharding=rep),
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
            (k, rows): compile_(
                f"step{k}x{rows}-{resolution}",  # the second number counts UNet rows per device
                _per_device(
                    mesh,
                    functools.partial(_steps_of_block, model, resolution, k, rows),
                    (_WHOLE, block_specs),
                    (_BLOCK, _BLOCK, _BLOCK),
                ),
                (rep, state_shardings),
                (sharded, sharded, sharded),
                params["unet"],
                state,
            )
            for k in steps_per_dispatch
            for rows in row_buckets
        }
        adapter_steps = {}
        if adapter_bank is not None:
            adapter_steps = {
                (k, rows, width): compile_(
                    # the widest keeps its earlier name (and program cache entry)
                    f"lorastep{k}x{rows}{'' if width == loras else f'w{width}'}-{resolution}",
                    _per_device(
                        mesh,
                        functools.partial(_adapter_steps_of_block, model, resolution, k, rows, width),
                        (_WHOLE, _WHOLE, block_specs),
                        (_BLOCK, _BLOCK, _BLOCK),
                    ),
                    (rep, rep, state_shardings),
                    (sharded, sharded, sharded),
                    params["unet"],
                    adapter_bank,
                    state,
                )
                for k in steps_per_dispatch
                for rows in row_buckets
                for width in adapter_widths(loras)
            }
        plan = Rearrangement(
            order=jax.ShapeDtypeStruct((slots,), jnp.int32, sharding=sharded),
            live=jax.ShapeDtypeStruct((slots,), jnp.bool_, sharding=sharded),
            held_source=jax.ShapeDtypeStruct((slots,), jnp.int32, sharding=sharded),
            held_take=jax.ShapeDtypeStruct((slots,), jnp.bool_, sharding=sharded),
        )
        rearrange = compile_(
            f"rearrange-{resolution}",
            _per_device(
                mesh,
                _rearrange,
                (Bank(block_specs, _BLOCK), Rearrangement(*[_BLOCK] * 4)),
                Bank(block_specs, _BLOCK),
            ),
            (bank_shardings, Rearrangement(*[sharded] * 4)),
            bank_shardings,
            bank,
            plan,
        )
        decode = {
            b: compile_(
                f"decode{b}-{resolution}",
                _per_device(
                    mesh,
                    functools.partial(_decode_rows, model, tuple(s for s in buckets if s <= b)),
                    (_WHOLE, _BLOCK, _WHOLE, _BLOCK),
                    _BLOCK,
                ),
                (rep, sharded, rep, sharded),
                sharded,
                params["vae"],
                bank.held,
                jax.ShapeDtypeStruct((), jnp.int32, sharding=rep),
                jax.ShapeDtypeStruct((mesh.size,), jnp.int32, sharding=sharded),
            )
            for b in buckets
        }
        by_resolution[resolution] = ResolutionPrograms(
            resolution, buckets, row_buckets, insert, steps, rearrange, decode, bank, adapter_steps
        )
    return ProgramSet(
        params, encode, by_resolution, compile_seconds, compiled_count, adapter_banks, encode_with_adapters
    )


def busy_slots(slots: SlotState) -> SlotState:
    """`slots` (the empty bank's) with every slot active from its first step, one unguided row each:
    a step over them runs its whole row bucket on every device. What a step costs is timed on these
    (the warm-up's estimates, benchmarks): on the empty bank every block has no active slot and the
    step skips its UNet (denoise.py), so it would time nothing."""
    num_steps, step = slots.num_steps, slots.step
    return slots._replace(
        num_steps=jax.device_put(
            np.full(num_steps.shape, slots.timesteps.shape[1], np.int32), num_steps.sharding
        ),
        step=jax.device_put(np.zeros(step.shape, np.int32), step.sharding),
        guided_until=jax.device_put(np.zeros(step.shape, np.int32), slots.guided_until.sharding),
    )


def is_abstract(params: Any) -> bool:
    """Whether `params` are shapes only (every leaf a `jax.ShapeDtypeStruct`)."""
    leaves = jax.tree_util.tree_leaves(params)
    return bool(leaves) and all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves)


def _abstract_on(tree: Any, sharding: Any) -> Any:
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def _zeros_on(tree: Any, sharding: Any) -> Any:
    return jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype, device=sharding), tree)


def _bank_shapes(
    model: LoadedModel,
    resolution: Resolution,
    slots: int,
    max_steps: int,
    embeds_spec: Any,
    pooled_spec: Any,
    loras: int = 0,
) -> Bank:
    """The shapes of one resolution's bank (all zeros when placed: empty slots, nothing held)."""
    h, w = resolution.height // model.vae_scale_factor, resolution.width // model.vae_scale_factor
    shape = jax.ShapeDtypeStruct
    latent_shape = (slots, model.latent_channels, h, w)
    state = SlotState(
        latents=shape(latent_shape, jnp.float32),
        prompt_embeds=shape((slots, 2, *embeds_spec.shape[1:]), embeds_spec.dtype),
        pooled=shape((slots, 2, pooled_spec.shape[1]), pooled_spec.dtype),
        guidance=shape((slots,), jnp.float32),
        guided_from=shape((slots,), jnp.int32),
        guided_until=shape((slots,), jnp.int32),
        timesteps=shape((slots, max_steps), jnp.int32),
        coefficients=shape((slots, max_steps, len(sampler_update.COEFFICIENTS)), jnp.float32),
        history=shape(latent_shape, jnp.float32),
        seed=shape((slots,), jnp.uint32),
        num_steps=shape((slots,), jnp.int32),
        step=shape((slots,), jnp.int32),
        lora_places=shape((slots, loras), jnp.int32),
        lora_scales=shape((slots, loras), jnp.float32),
    )
    return Bank(state, shape(latent_shape, jnp.float32))
