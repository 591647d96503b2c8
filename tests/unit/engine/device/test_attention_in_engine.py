"""`--attention flash` through the real engine: the same images as `xla`, within one level of 255."""

from __future__ import annotations

import pytest
from engine_helpers import make_config, max_level_difference, request, run
from sdxl_server.engine import JaxEngine
from sdxl_server.engine.api import Resolution

# The demo model attends at full latent resolution: at 256x256 its first level attends over 32 x 32 =
# 1,024 tokens (4 heads) and so does the VAE's mid block: both through the kernel; its second level (256
# tokens) and the cross attention to 77 text tokens are small enough to keep diffusers' code.
SIZE = Resolution(256, 256)


@pytest.fixture(scope="module")
def images_by_attention(tiny_model_dir, compilation_cache_dir):
    images = {}
    for attention in ("xla", "flash"):
        config = make_config(
            tiny_model_dir,
            compilation_cache_dir,
            model="demo",
            resolutions=(SIZE,),
            slots_per_device=1,
            steps_per_dispatch=1,
            attention=attention,
        )
        engine = JaxEngine(config)
        engine.start()
        try:
            assert engine.config.attention == attention
            req = request(f"attention-{attention}", prompt="a red circle on a blue background", seed=5,
                          steps=6, resolution=SIZE)  # fmt: skip
            images[attention] = run(engine, req).images()[0]
        finally:
            engine.stop(drain_seconds=10)
    return images


@pytest.mark.slow
def test_flash_images_equal_xla_s_within_one_level(images_by_attention):
    xla, flash = images_by_attention["xla"], images_by_attention["flash"]
    assert xla.shape == (SIZE.height, SIZE.width, 3)
    assert xla.std() > 10  # a drawn image, not a flat one that would agree trivially
    assert max_level_difference(flash, xla) <= 1


def test_auto_attention_resolves_per_platform():
    from sdxl_server.engine.device.attention import resolve_attention

    assert [resolve_attention("auto", p) for p in ("tpu", "cpu", "gpu")] == ["flash", "flash", "xla"]
    assert resolve_attention("xla", "tpu") == "xla"
