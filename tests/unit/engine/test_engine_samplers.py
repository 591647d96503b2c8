"""A sampler per request: each sampler and spacing the engine serves gives the image of its oracle, alone
and mixed with other samplers in one batch (one compiled step for all of them).

Oracles: FlaxStableDiffusionXLPipeline, untouched, with diffusers' Flax scheduler of that name built
`from_config` from the tiny model's scheduler config (Euler linspace, DDIM leading, DPM-Solver++); where
diffusers has no Flax scheduler (Euler trailing, DDIM trailing, LCM), the pipeline's own UNet and VAE
around a numpy reference written from the published update rule (sampler_references.py names each
source). Images are compared within one level, as in test_engine_oracle.py.
"""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest
import sampler_references
from engine_helpers import SQUARE, WIDE, Recorder, max_level_difference, request, run

DMD2_TIMESTEPS = (999, 749, 499, 249)


@pytest.fixture(scope="module")
def oracle(tiny_model_dir, engine):  # after the engine: it turns the persistent compilation cache on
    import jax
    import jax.numpy as jnp
    from diffusers import (
        FlaxDDIMScheduler,
        FlaxDPMSolverMultistepScheduler,
        FlaxEulerDiscreteScheduler,
        FlaxStableDiffusionXLPipeline,
    )
    from sdxl_server.engine.models.quiet_libraries import silence_library_noise

    silence_library_noise()
    pipeline, params = FlaxStableDiffusionXLPipeline.from_pretrained(str(tiny_model_dir))
    config = dict(pipeline.scheduler.config)
    flax_classes = {
        "euler": FlaxEulerDiscreteScheduler,
        "ddim": FlaxDDIMScheduler,
        "dpmpp_2m": FlaxDPMSolverMultistepScheduler,
    }
    parts = ("text_encoder", "text_encoder_2", "vae", "tokenizer", "tokenizer_2", "unet")

    def with_flax_scheduler(sampler, spacing, prompt, seed, steps, guidance, resolution):
        scheduler = flax_classes[sampler].from_config(config, timestep_spacing=spacing)
        if sampler == "dpmpp_2m":
            scheduler.register_to_config(steps_offset=0)  # read for "leading", not declared by the class
        swapped = type(pipeline)(**{name: getattr(pipeline, name) for name in parts}, scheduler=scheduler)
        images = swapped(
            swapped.prepare_inputs([prompt]),
            {**params, "scheduler": scheduler.create_state()},
            jax.random.PRNGKey(seed),
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=resolution.height,
            width=resolution.width,
            jit=False,
        ).images
        return np.round(np.asarray(images[0]) * 255).astype(np.uint8)

    def with_reference(reference, prompt, seed, guidance, resolution):
        """The pipeline's _generate with its scheduler replaced by a numpy reference."""
        _, init_noise_sigma, run_reference = reference
        embeds, pooled = pipeline.get_embeddings(pipeline.prepare_inputs([prompt]), params)
        h, w = resolution.height, resolution.width
        time_ids = pipeline._get_add_time_ids((h, w), (0, 0), (h, w), 1, dtype=embeds.dtype)
        embeds = jnp.concatenate([jnp.zeros_like(embeds), embeds])  # no negative prompt: zeros
        pooled = jnp.concatenate([jnp.zeros_like(pooled), pooled])
        time_ids = jnp.concatenate([time_ids, time_ids])
        shape = (1, pipeline.unet.config.in_channels, h // 8, w // 8)
        noise = np.asarray(jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32), np.float64)

        def model(unet_input, t):
            rows = jnp.asarray(np.concatenate([unet_input] * 2), jnp.float32)
            out = pipeline.unet.apply(
                {"params": params["unet"]},
                rows,
                jnp.array([t, t], jnp.int32),
                encoder_hidden_states=embeds,
                added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
            ).sample
            uncond, cond = np.split(np.asarray(out, np.float64), 2)
            if guidance <= 1:  # no classifier-free guidance: the conditional prediction (diffusers' rule)
                return cond
            return uncond + guidance * (cond - uncond)

        latents = run_reference(noise * init_noise_sigma, model, seed)
        latents = jnp.asarray(latents / pipeline.vae.config.scaling_factor, jnp.float32)
        image = pipeline.vae.apply({"params": params["vae"]}, latents, method=pipeline.vae.decode).sample
        image = (image / 2 + 0.5).clip(0, 1).transpose(0, 2, 3, 1)
        return np.round(np.asarray(image[0]) * 255).astype(np.uint8)

    def generate(sampler, spacing, timesteps, prompt, seed, steps, guidance, resolution):
        if sampler == "euler" and spacing == "trailing":
            return with_reference(
                sampler_references.euler_trailing(steps), prompt, seed, guidance, resolution
            )
        if sampler == "ddim" and spacing == "trailing":
            return with_reference(
                sampler_references.ddim("trailing", steps), prompt, seed, guidance, resolution
            )
        if sampler == "lcm":
            reference = sampler_references.lcm(steps, timesteps)
            return with_reference(reference, prompt, seed, guidance, resolution)
        return with_flax_scheduler(sampler, spacing, prompt, seed, steps, guidance, resolution)

    return generate


def sampler_request(request_id, sampler, spacing, timesteps, prompt, seed, steps, guidance, resolution):
    return dataclasses.replace(
        request(
            request_id, prompt=prompt, seed=seed, steps=steps, guidance_scale=guidance, resolution=resolution
        ),
        sampler=sampler,
        timestep_spacing=spacing,
        timesteps=timesteps,
    )


# sampler, spacing, explicit timesteps, prompt, seed, steps, guidance, resolution
CASES = [
    ("euler", "linspace", (), "a red bicycle", 3, 4, 7.5, WIDE),
    ("euler", "trailing", (), "a mountain lake", 4, 4, 7.5, SQUARE),
    ("ddim", "leading", (), "an old clock", 5, 4, 7.5, SQUARE),
    ("ddim", "trailing", (), "a small boat", 6, 3, 7.5, WIDE),
    ("dpmpp_2m", "leading", (), "a green hill", 7, 5, 7.5, SQUARE),
    ("dpmpp_2m", "trailing", (), "a lighthouse", 8, 4, 7.5, WIDE),
    ("lcm", "", (), "a photo of a cat", 9, 4, 1.0, SQUARE),  # unguided, as LCM runs
    ("lcm", "", DMD2_TIMESTEPS, "a photo of a dog", 2**40 + 10, 4, 0.0, WIDE),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sampler", "spacing", "timesteps", "prompt", "seed", "steps", "guidance", "resolution"), CASES
)
def test_each_sampler_equals_its_oracle(
    engine, oracle, sampler, spacing, timesteps, prompt, seed, steps, guidance, resolution
):
    case = (sampler, spacing, timesteps, prompt, seed, steps, guidance, resolution)
    image = run(engine, sampler_request(f"sampler-{sampler}-{spacing}-{seed}", *case)).images()[0]
    expected = oracle(*case)
    assert image.shape == (resolution.height, resolution.width, 3)
    assert max_level_difference(image, expected) <= 1


@pytest.mark.slow
def test_samplers_mixed_in_one_batch_give_the_images_they_give_alone(engine, oracle):
    """Three samplers (a guided Euler trailing, an unguided LCM with fresh noise, a guided DPM-Solver++
    with its history) run at once in one block's slots; each image still equals its oracle."""
    from engine_helpers import WAIT_SECONDS
    from sdxl_server.engine.api import Finished

    cases = [CASES[1], CASES[6], CASES[5]]
    cases = [(s, sp, ts, p, seed + 100, steps, g, SQUARE) for s, sp, ts, p, seed, steps, g, _ in cases]
    release = threading.Event()
    recorders = [Recorder(on_progress=lambda _: release.wait(WAIT_SECONDS)), Recorder(), Recorder()]
    for i, case in enumerate(cases):
        engine.submit(sampler_request(f"mixed-{i}", *case), recorders[i])
    release.set()
    for recorder, case in zip(recorders, cases, strict=True):
        assert isinstance(recorder.wait(), Finished)
        assert max_level_difference(recorder.images()[0], oracle(*case)) <= 1

    trace = engine.trace()
    admitted = [
        next(e.boundary for e in trace if e.request_id == f"mixed-{i}" and e.kind == "admit")
        for i in range(3)
    ]
    finished = [
        next(e.boundary for e in trace if e.request_id == f"mixed-{i}" and e.kind == "finish")
        for i in range(3)
    ]
    assert max(admitted) < min(finished), "the three samplers never shared a step: the test mixed nothing"


def test_a_direct_caller_that_names_no_spacing_gets_the_samplers_default(engine):
    """GenerationRequest's `timestep_spacing` defaults to "" (unset): LCM runs its own schedule instead
    of being refused a spacing it cannot use, and Euler takes the model's default (leading here)."""
    few = dict(steps=2, guidance_scale=0.0, seed=71)
    run(engine, dataclasses.replace(request("lcm-unset", **few), sampler="lcm"))
    unset = run(engine, request("euler-unset", **few)).images()[0]
    leading = run(engine, dataclasses.replace(request("euler-leading", **few), timestep_spacing="leading"))
    assert max_level_difference(unset, leading.images()[0]) == 0
