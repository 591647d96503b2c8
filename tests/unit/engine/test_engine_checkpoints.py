"""A single-file SDXL checkpoint serves the same images as the Flax-format model it was written from.

The single file (sdxl_test_support.checkpoint_writers: Stability's original layout, OpenCLIP's fused q/k/v) is
read with the tiny model's configs by an engine with the shared engine's settings (one of its resolutions,
so that its start loads half the shared engine's compiled programs); each image must equal
the shared engine's (the Flax folder) within one level of 255. The PyTorch-layout folder is served by a
real server in tests/integration/test_checkpoint_served.py; both layouts' parameters are compared exactly
in tests/unit/checkpoints/.
"""

from __future__ import annotations

import pytest
from engine_helpers import SQUARE, make_config, max_level_difference, request, run
from sdxl_server.engine import JaxEngine
from sdxl_test_support.checkpoint_writers import write_single_file


@pytest.fixture(scope="module")
def single_file_engine(tiny_model_dir, compilation_cache_dir, tmp_path_factory, engine):
    # After the shared engine: its programs are in the compilation cache, so this start only loads them.
    checkpoint = write_single_file(
        tiny_model_dir, tmp_path_factory.mktemp("single-file") / "sdxl.safetensors"
    )
    config = make_config(
        tiny_model_dir,
        compilation_cache_dir,
        model=str(checkpoint),
        model_configs=str(tiny_model_dir),
        resolutions=(SQUARE,),
    )
    started = JaxEngine(config)
    started.start()
    yield started
    started.stop(drain_seconds=10)


@pytest.mark.slow
def test_a_single_file_checkpoint_serves_the_flax_models_images(engine, single_file_engine):
    cases = [
        request(
            "single-file-square", prompt="a red bicycle", negative_prompt="blurry", seed=3, resolution=SQUARE
        ),
        request("single-file-two", prompt="a mountain lake", seed=11, steps=3, num_images=2),
    ]
    for case in cases:
        served = run(single_file_engine, case).images()
        expected = run(engine, case).images()
        assert sorted(served) == sorted(expected) == list(range(case.num_images))
        for index, image in served.items():
            assert image.shape == (case.resolution.height, case.resolution.width, 3)
            assert max_level_difference(image, expected[index]) <= 1, (case.request_id, index)
            assert image.std() > 0  # an image, not a constant that any two broken loads would share
