"""Rows, not slots, on the shared engine: guidance per request, mixed in one batch.

An unguided image (guidance <= 1) runs its conditional UNet row alone, as diffusers' PyTorch pipelines
do; its oracle is the Flax pipeline at guidance 1.0, which computes both rows and mixes them to the
conditional one up to rounding. A guidance interval switches a slot from two rows to one mid-image; its
oracle is the Flax pipeline's own loop (FlaxStableDiffusionXLPipeline._generate, with its scheduler
and UNet) written out with the interval applied: both rows and the CFG mix on guided steps, the
conditional row alone on the others.
"""

from __future__ import annotations

import pytest
from engine_helpers import SQUARE, Recorder, max_level_difference, request, run
from sdxl_server.engine.api import Finished


@pytest.fixture(scope="module")
def flax(tiny_model_dir, engine):  # after the engine: it turns the persistent compilation cache on
    from diffusers import FlaxStableDiffusionXLPipeline
    from sdxl_server.engine.models.quiet_libraries import silence_library_noise

    silence_library_noise()
    return FlaxStableDiffusionXLPipeline.from_pretrained(str(tiny_model_dir))


def interval_oracle(flax, prompt, seed, steps, guidance, guided, resolution):
    """The pipeline's `_generate` (no negative prompt: zero unconditional embeddings), step by step,
    with guidance only on the steps in range(*guided)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    pipeline, params = flax
    h, w = resolution.height, resolution.width
    embeds, pooled = pipeline.get_embeddings(pipeline.prepare_inputs([prompt]), params)
    time_ids = pipeline._get_add_time_ids((h, w), (0, 0), (h, w), 1, dtype=embeds.dtype)
    both = {
        "embeds": jnp.concatenate([jnp.zeros_like(embeds), embeds]),
        "pooled": jnp.concatenate([jnp.zeros_like(pooled), pooled]),
        "time_ids": jnp.concatenate([time_ids, time_ids]),
    }
    shape = (
        1,
        pipeline.unet.config.in_channels,
        h // pipeline.vae_scale_factor,
        w // pipeline.vae_scale_factor,
    )
    latents = jax.random.normal(jax.random.PRNGKey(seed), shape=shape, dtype=jnp.float32)
    state = pipeline.scheduler.set_timesteps(params["scheduler"], num_inference_steps=steps, shape=shape)
    latents = latents * state.init_noise_sigma
    for i in range(steps):
        t = jnp.array(state.timesteps, dtype=jnp.int32)[i]
        two = guided[0] <= i < guided[1]
        rows = 2 if two else 1
        model_input = pipeline.scheduler.scale_model_input(state, jnp.concatenate([latents] * rows), t)
        prediction = pipeline.unet.apply(
            {"params": params["unet"]},
            model_input,
            jnp.broadcast_to(t, rows).astype(jnp.int32),
            encoder_hidden_states=both["embeds"][2 - rows :],
            added_cond_kwargs={
                "text_embeds": both["pooled"][2 - rows :],
                "time_ids": both["time_ids"][2 - rows :],
            },
        ).sample
        if two:
            uncond, cond = jnp.split(prediction, 2)
            prediction = uncond + jnp.float32(guidance) * (cond - uncond)
        latents, state = pipeline.scheduler.step(state, prediction, t, latents).to_tuple()
    latents = 1 / pipeline.vae.config.scaling_factor * latents
    image = pipeline.vae.apply({"params": params["vae"]}, latents, method=pipeline.vae.decode).sample
    image = (image / 2 + 0.5).clip(0, 1).transpose(0, 2, 3, 1)
    return np.round(np.asarray(image[0]) * 255).astype(np.uint8)


@pytest.mark.slow
@pytest.mark.parametrize("guidance", [0.0, 1.0])
def test_an_unguided_image_equals_the_pipeline_at_guidance_one(engine, flax, guidance):
    image = run(engine, request(f"unguided-{guidance}", seed=21, steps=4, guidance_scale=guidance)).images()[
        0
    ]
    expected = interval_oracle(flax, "a photo of a cat", 21, 4, 1.0, (0, 4), SQUARE)  # both rows, mixed at 1
    assert max_level_difference(image, expected) <= 1


@pytest.mark.slow
def test_a_slot_dropping_to_one_row_at_its_interval_end_equals_its_oracle(engine, flax):
    req = request("interval-oracle", seed=22, steps=6, guidance_scale=7.5, guidance_interval=(0.0, 0.5))
    image = run(engine, req).images()[0]
    expected = interval_oracle(flax, "a photo of a cat", 22, 6, 7.5, (0, 3), SQUARE)
    assert max_level_difference(image, expected) <= 1
    full = interval_oracle(flax, "a photo of a cat", 22, 6, 7.5, (0, 6), SQUARE)
    assert max_level_difference(image, full) > 1, "the interval made no difference: the test proves nothing"


@pytest.mark.slow
def test_mixed_guidance_in_one_batch_gives_the_same_images_as_alone(engine):
    cases = [
        dict(prompt="a red boat", seed=51, steps=5, guidance_scale=0.0),
        dict(prompt="a green hill", seed=52, steps=4, guidance_scale=6.0),
        dict(prompt="a blue door", seed=53, steps=6, guidance_scale=6.0, guidance_interval=(0.0, 0.4)),
    ]
    alone = [run(engine, request(f"alone-{i}", **case)).images()[0] for i, case in enumerate(cases)]
    recorders = [Recorder() for _ in cases]

    joined: list[bool] = []

    def join_once(_progress) -> None:  # on the step loop, between two boundaries: both join the next one
        if not joined:
            joined.append(True)
            for i in (1, 2):
                engine.submit(request(f"together-{i}", **cases[i]), recorders[i])

    recorders[0] = Recorder(on_progress=join_once)
    engine.submit(request("together-0", **cases[0]), recorders[0])
    for recorder, expected in zip(recorders, alone, strict=True):
        assert isinstance(recorder.wait(), Finished)
        assert max_level_difference(recorder.images()[0], expected) <= 1
    shared = [
        e for e in engine.trace() if e.kind == "step" and "slots=3" in e.detail and "rows=5" in e.detail
    ]
    assert shared, "the three never shared a step with 1 + 2 + 2 rows"
