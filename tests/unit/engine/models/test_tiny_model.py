"""The tiny random SDXL loads through diffusers' own pipeline and produces varied images."""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import numpy as np
import pytest
from diffusers import FlaxStableDiffusionXLPipeline
from sdxl_server.engine.models.quiet_libraries import silence_library_noise
from sdxl_server.engine.models.tiny_model import COMPLETION_MARKER, ensure_tiny_model


@pytest.fixture(scope="module")
def pipeline(tiny_model_dir: pathlib.Path) -> tuple[Any, Any]:
    silence_library_noise()
    return FlaxStableDiffusionXLPipeline.from_pretrained(tiny_model_dir)


def _parameter_count(tree: Any) -> int:
    return sum(int(np.size(leaf)) for leaf in jax.tree_util.tree_leaves(tree))


@pytest.fixture(scope="module")
def generate(pipeline: tuple[Any, Any]) -> Callable[[str, int], np.ndarray]:
    """The pipeline's own generation (jit=False), jitted as a whole so that the three images of the test
    below share one compilation instead of each running op by op."""
    pipe, params = pipeline

    @jax.jit
    def images(prompt_ids: jax.Array, key: jax.Array) -> jax.Array:
        output = pipe(prompt_ids, params, key, num_inference_steps=2, height=64, width=64, jit=False)
        return output.images

    return lambda prompt, seed: np.asarray(images(pipe.prepare_inputs([prompt]), jax.random.PRNGKey(seed)))


def test_configuration_ties_the_components_together(pipeline: tuple[Any, Any]) -> None:
    pipe, params = pipeline
    text_1, text_2, unet, vae = (
        pipe.text_encoder.config,
        pipe.text_encoder_2.config,
        pipe.unet.config,
        pipe.vae.config,
    )
    assert unet.cross_attention_dim == text_1.hidden_size + text_2.hidden_size
    assert unet.addition_embed_type == "text_time"
    assert (
        unet.projection_class_embeddings_input_dim == 6 * unet.addition_time_embed_dim + text_2.projection_dim
    )
    assert all(width % 32 == 0 for width in (*unet.block_out_channels, *vae.block_out_channels))
    assert pipe.vae_scale_factor == 8
    for tokenizer, text in ((pipe.tokenizer, text_1), (pipe.tokenizer_2, text_2)):
        assert tokenizer.model_max_length == 77 <= text.max_position_embeddings
        # Flax CLIP pools at the largest id, which must be the end-of-text token.
        assert tokenizer.eos_token_id == max(tokenizer.get_vocab().values()) == text.eos_token_id
    assert pipe.scheduler.config.timestep_spacing == "leading"
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    models = {name: tree for name, tree in params.items() if name != "scheduler"}
    assert set(models) == {"text_encoder", "text_encoder_2", "unet", "vae"}
    assert 1_500_000 < _parameter_count(models) < 2_500_000


def test_pipeline_makes_varied_images(generate: Callable[[str, int], np.ndarray]) -> None:
    image = generate("a red cat", 0)
    assert image.shape == (1, 64, 64, 3)
    assert np.isfinite(image).all()
    assert image.std() > 0.05, "the random weights give a flat image"
    assert np.abs(generate("a red cat", 1) - image).mean() > 0.01, "seed is ignored"
    assert np.abs(generate("a blue dog", 0) - image).mean() > 0.01, "prompt is ignored"


def test_ensure_is_idempotent(tiny_model_dir: pathlib.Path) -> None:
    marker = tiny_model_dir / COMPLETION_MARKER
    before = marker.stat().st_mtime_ns
    assert ensure_tiny_model(tiny_model_dir) == tiny_model_dir
    assert marker.stat().st_mtime_ns == before


def test_concurrent_builds_replace_an_older_recipe_with_one_deterministic_model(
    tmp_path: pathlib.Path, tiny_model_dir: pathlib.Path
) -> None:
    target = tmp_path / "tiny"
    target.mkdir()
    (target / ".tiny-sdxl-v0-complete").write_text("complete\n")
    (target / "stale.msgpack").write_text("weights of an older recipe")

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(ensure_tiny_model, [target, target]))

    assert results == [target, target]
    assert [path.name for path in tmp_path.iterdir()] == ["tiny"], "a staging directory was left behind"
    built = sorted(path.relative_to(target) for path in target.rglob("*") if path.is_file())
    shared = sorted(path.relative_to(tiny_model_dir) for path in tiny_model_dir.rglob("*") if path.is_file())
    assert built == shared  # the marker is the current one and the stale file is gone
    for relative in built:
        assert (target / relative).read_bytes() == (tiny_model_dir / relative).read_bytes(), relative


def test_ensure_refuses_a_directory_holding_something_else(tmp_path: pathlib.Path) -> None:
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "unrelated.txt").write_text("not a model")
    with pytest.raises(FileExistsError, match="no complete tiny model"):
        ensure_tiny_model(tmp_path / "tiny")
