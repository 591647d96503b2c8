"""`--fuse-lora`: the engine's image with a fused adapter equals the Flax pipeline's with the adapter
merged into its parameters by the test (W + s * alpha/rank * up @ down, by hand: lora_writers).

The adapter (kohya format, kohya's original SDXL UNet names, UNet and both text encoders) is written by
sdxl_test_support.lora_writers; the oracle is the library's pipeline, untouched, jit=False, batch 1.
Tolerance: one level of 255, as for the engine's own oracle (XLA may round a batch of one and the
engine's batch differently in the last bit).
"""

from __future__ import annotations

import numpy as np
import pytest
from engine_helpers import SQUARE, make_config, max_level_difference, request, run
from sdxl_server.engine import JaxEngine
from sdxl_server.engine.adapters.fuse_spec import FusedLora
from sdxl_test_support.lora_writers import merged_flax_params, random_layers, write_kohya

SCALE = 0.8


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory):
    layers = random_layers(tiny_model_dir, rank=4, alpha=2.0, seed=7)
    path = tmp_path_factory.mktemp("fused") / "lightning-like.safetensors"
    write_kohya(tiny_model_dir, layers, path, original_unet_names=True)
    return layers, path


@pytest.fixture(scope="module")
def fused_engine(tiny_model_dir, compilation_cache_dir, adapter, engine):
    # After the shared engine: the programs do not depend on the weights' values, so this start loads them.
    _, path = adapter
    config = make_config(
        tiny_model_dir,
        compilation_cache_dir,
        resolutions=(SQUARE,),
        fuse_lora=(FusedLora(str(path), SCALE),),
    )
    started = JaxEngine(config)
    started.start()
    yield started
    started.stop(drain_seconds=10)


@pytest.mark.slow
def test_a_fused_adapter_gives_the_pipelines_image_with_the_adapter_merged(
    tiny_model_dir, adapter, fused_engine, engine
):
    import jax
    from diffusers import FlaxStableDiffusionXLPipeline
    from sdxl_server.engine.models.quiet_libraries import silence_library_noise

    silence_library_noise()
    layers, _ = adapter
    pipeline, params = FlaxStableDiffusionXLPipeline.from_pretrained(str(tiny_model_dir))
    merged = merged_flax_params(params, [(layers, SCALE)], dtype=np.float16)  # the file stores fp16

    prompt, negative, seed, steps, guidance = "a red bicycle", "blurry", 5, 4, 7.5
    expected = pipeline(
        pipeline.prepare_inputs([prompt]),
        merged,
        jax.random.PRNGKey(seed),
        num_inference_steps=steps,
        guidance_scale=guidance,
        height=SQUARE.height,
        width=SQUARE.width,
        neg_prompt_ids=pipeline.prepare_inputs([negative]),
        jit=False,
    ).images
    expected = np.round(np.asarray(expected[0]) * 255).astype(np.uint8)

    case = request(
        "fused", prompt=prompt, negative_prompt=negative, seed=seed, steps=steps, guidance_scale=guidance
    )
    served = run(fused_engine, case).images()[0]
    assert max_level_difference(served, expected) <= 1
    # The adapter changed the image: an engine that ignored --fuse-lora would fail the equality above.
    unfused = run(engine, case).images()[0]
    assert max_level_difference(served, unfused) > 10
