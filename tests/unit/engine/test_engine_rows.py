"""Rows, not slots, on the shared engine: guidance per request, mixed in one batch.

An unguided image (guidance <= 1) runs its conditional UNet row alone, as diffusers' PyTorch pipelines
do; its oracle is the Flax pipeline at guidance 1.0, which computes both rows and mixes them to the
conditional one up to rounding. A guidance interval switches a slot from two rows to one mid-image; its
oracle is the Flax pipeline's own loop (FlaxStableDiffusionXLPipeline._generate, with its scheduler
and UNet) written out with the interval applied: both rows and the CFG mix on guided steps, the
conditional row alone on the others.

Rows are the capacity: the shared engine's device (3 slots per device: 6 rows) holds 3 guided images
or 6 unguided ones, and an image enters only when its rows fit at every future step.
"""

from __future__ import annotations

import threading

import pytest
from engine_helpers import (
    SQUARE,
    WAIT_SECONDS,
    Recorder,
    bucket_of,
    max_level_difference,
    request,
    run,
    trace_between,
)
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


def _join_at_the_next_boundary(engine, first_request, *others):
    """Submits `first_request`, holds the step loop inside its first Progress until `others` (request,
    recorder) are queued, so that they all reach the same boundary; returns the first's recorder."""
    start = engine.loop_statistics().boundary
    release = threading.Event()
    first = Recorder(on_progress=lambda _: release.wait(WAIT_SECONDS))
    engine.submit(first_request, first)
    while not trace_between(engine, start, "step"):
        release.wait(0.01)  # polls the trace until the first step was dispatched
    try:
        for req, recorder in others:
            engine.submit(req, recorder)
    finally:
        release.set()
    return first


def _boundaries(engine, request_id: str, kind: str) -> list[int]:
    return [e.boundary for e in engine.trace() if e.request_id == request_id and e.kind == kind]


def test_twice_the_slots_of_unguided_images_run_in_one_step_of_all_the_rows(engine):
    rows = 2 * engine.config.slots_per_device  # 6 rows: 3 guided images, or 6 unguided ones
    start = engine.loop_statistics().boundary
    three, two = Recorder(), Recorder()
    unguided = dict(guidance_scale=0.0, steps=4)
    first = _join_at_the_next_boundary(
        engine,
        request("unguided-first", seed=61, **unguided),
        (request("unguided-three", seed=62, num_images=3, **unguided), three),
        (request("unguided-two", seed=65, num_images=rows - 4, **unguided), two),
    )
    for recorder in (first, three, two):
        assert isinstance(recorder.wait(), Finished)
    steps = trace_between(engine, start, "step")
    full = [e for e in steps if f"slots={rows} rows={rows}" in e.detail]
    assert full and all(bucket_of(e) == rows for e in full), [e.detail for e in steps]
    alone = run(engine, request("unguided-alone", seed=66, **unguided)).images()[0]
    assert max_level_difference(two.images()[1], alone) <= 1  # seed 65 + index 1, among 5 batch-mates


def test_a_guided_image_waits_while_the_rows_are_full(engine):
    rows = 2 * engine.config.slots_per_device
    rest, guided = Recorder(), Recorder()
    first = _join_at_the_next_boundary(
        engine,
        request("full-rows-first", seed=63, steps=5, guidance_scale=0.0),
        (request("full-rows-rest", seed=64, steps=4, guidance_scale=0.0, num_images=rows - 2), rest),
        (request("full-rows-last", seed=68, steps=4, guidance_scale=0.0), Recorder()),
        (request("full-rows-guided", seed=65, steps=3), guided),
    )
    for recorder in (first, rest, guided):
        assert isinstance(recorder.wait(), Finished)
    # One row freed when the first ended, which a guided image cannot use; it entered once the rest ended.
    (admitted,) = _boundaries(engine, "full-rows-guided", "admit")
    assert admitted > max(_boundaries(engine, "full-rows-last", "admit"))
    assert admitted >= max(_boundaries(engine, "full-rows-rest", "finish"))


def test_a_slot_dropping_to_one_row_frees_room_that_the_next_boundary_uses(engine):
    start = engine.loop_statistics().boundary
    late = dict(prompt="a yellow kite", seed=69, steps=2, guidance_scale=0.0)
    guided, unguided = Recorder(), Recorder()
    interval = _join_at_the_next_boundary(  # 2 rows for its steps 0..3, then 1
        engine,
        request("drop-interval", seed=66, steps=8, guidance_interval=(0.0, 0.5)),
        (request("drop-guided", seed=67, steps=8, num_images=2), guided),  # 2 + 2 + 2: the rows are full
        (request("drop-unguided", **late), unguided),
    )
    for recorder in (interval, guided, unguided):
        assert isinstance(recorder.wait(), Finished)
    (admitted,) = _boundaries(engine, "drop-unguided", "admit")
    assert admitted < min(_boundaries(engine, "drop-guided", "finish"))  # it did not wait for an end
    first_step = next(e for e in trace_between(engine, start, "step") if e.boundary == admitted + 1)
    assert "slots=4 rows=6" in first_step.detail  # 1 + 2 + 2 + 1: it took the row the interval freed
    alone = run(engine, request("drop-unguided-alone", **late)).images()[0]
    assert max_level_difference(unguided.images()[0], alone) <= 1
