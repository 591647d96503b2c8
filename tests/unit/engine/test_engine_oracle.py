"""Each image equals what FlaxStableDiffusionXLPipeline produces for the same inputs (within one level).

The oracle is the library's own pipeline, untouched: jit=False, batch 1, PRNGKey(seed), the same
parameters loaded from the same directory. (Its fori_loop compiles once per call; the session's
persistent compilation cache, enabled by the engine fixture, turns repeats into loads.)
"""

from __future__ import annotations

import numpy as np
import pytest
from engine_helpers import SQUARE, WIDE, max_level_difference, request, run


@pytest.fixture(scope="module")
def oracle(tiny_model_dir, engine):  # after the engine: it turns the persistent compilation cache on
    import jax
    from diffusers import FlaxStableDiffusionXLPipeline
    from sdxl_server.engine.models.quiet_libraries import silence_library_noise

    silence_library_noise()
    pipeline, params = FlaxStableDiffusionXLPipeline.from_pretrained(str(tiny_model_dir))

    def generate(prompt, negative_prompt, seed, steps, guidance_scale, resolution) -> np.ndarray:
        images = pipeline(
            pipeline.prepare_inputs([prompt]),
            params,
            jax.random.PRNGKey(seed),
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            height=resolution.height,
            width=resolution.width,
            neg_prompt_ids=pipeline.prepare_inputs([negative_prompt]) if negative_prompt else None,
            jit=False,
        ).images
        return np.round(np.asarray(images[0]) * 255).astype(np.uint8)

    return generate


# prompt, negative prompt, seed, steps, guidance, resolution: every value of each dimension appears.
CASES = [
    ("a photo of a cat", "", 0, 1, 7.5, SQUARE),
    ("a red bicycle leaning on a wall", "blurry", 42, 4, 1.0, WIDE),
    ("a mountain lake at dawn", "", 7, 9, 7.5, WIDE),
    ("", "low quality, watermark", 123456789, 4, 7.5, SQUARE),
    ("a photo of a cat", "blurry", 2**40 + 5, 9, 1.0, SQUARE),  # seeds beyond 32 bits
]


@pytest.mark.slow
@pytest.mark.parametrize(("prompt", "negative", "seed", "steps", "guidance", "resolution"), CASES)
def test_image_equals_the_pipeline(engine, oracle, prompt, negative, seed, steps, guidance, resolution):
    req = request(
        f"oracle-{seed}-{steps}",
        prompt=prompt,
        negative_prompt=negative,
        seed=seed,
        steps=steps,
        guidance_scale=guidance,
        resolution=resolution,
    )
    image = run(engine, req).images()[0]
    expected = oracle(prompt, negative, seed, steps, guidance, resolution)
    assert image.shape == (resolution.height, resolution.width, 3)
    assert max_level_difference(image, expected) <= 1


@pytest.mark.slow
def test_image_i_of_a_request_uses_seed_plus_i(engine, oracle):
    recorder = run(engine, request("seeds", prompt="a lighthouse", seed=5, num_images=2, resolution=WIDE))
    images = recorder.images()
    assert sorted(images) == [0, 1]
    for index, image in images.items():
        expected = oracle("a lighthouse", "", 5 + index, 4, 7.5, WIDE)
        assert max_level_difference(image, expected) <= 1
    assert not np.array_equal(images[0], images[1])


@pytest.mark.slow
def test_images_stay_equal_to_the_pipeline_when_busy_slots_are_packed(engine, oracle):
    """A short request finishes first and leaves a hole at the front of the block: the others move down
    (the rearrange program), run in a smaller bucket, and still end with the pipeline's images."""
    import threading

    from engine_helpers import WAIT_SECONDS, Recorder
    from sdxl_server.engine.api import Finished

    # The short one runs 3 steps: K=2 in its first dispatch (nobody waits yet), so it is still in its
    # slot when the others join, and finishes one dispatch later, at the front of the block.
    cases = [("a small boat", 11, 3), ("a green hill", 12, 7), ("an old clock", 13, 5)]
    release = threading.Event()
    recorders = [Recorder(on_progress=lambda _: release.wait(WAIT_SECONDS)), Recorder(), Recorder()]
    start = engine.loop_statistics().boundary
    prompt, seed, steps = cases[0]
    engine.submit(request("pack-0", prompt=prompt, seed=seed, steps=steps), recorders[0])
    while not any(e.kind == "step" and e.boundary > start for e in engine.trace()):
        release.wait(0.01)  # polls the trace until the short request's first step was dispatched
    for i, (prompt, seed, steps) in enumerate(cases[1:], start=1):
        engine.submit(request(f"pack-{i}", prompt=prompt, seed=seed, steps=steps), recorders[i])
    release.set()
    for recorder, (prompt, seed, steps) in zip(recorders, cases, strict=True):
        assert isinstance(recorder.wait(), Finished)
        expected = oracle(prompt, "", seed, steps, 7.5, SQUARE)
        assert max_level_difference(recorder.images()[0], expected) <= 1

    def slot(request_id: str, kind: str) -> int:
        return next(e.slot for e in engine.trace() if e.request_id == request_id and e.kind == kind)

    moved = [i for i in (1, 2) if slot(f"pack-{i}", "admit") != slot(f"pack-{i}", "finish")]
    assert moved, "no slot was moved: the test did not exercise packing"
