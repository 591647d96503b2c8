"""A PyTorch-layout folder and a single file of the tiny model load to exactly the Flax model's parameters.

Exact equality, leaf by leaf: the conversion only renames, transposes, splits and casts, so any
difference is a bug (a wrong transpose of a square kernel would keep every shape). The images the engine
and the server make from these checkpoints are compared in tests/unit/engine/test_engine_checkpoints.py
and tests/integration/test_checkpoint_served.py.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from sdxl_server.engine.models.checkpoints import load_pipeline
from sdxl_server.engine.models.quiet_libraries import silence_library_noise
from sdxl_test_support.checkpoint_writers import read_flax_params, write_pytorch_folder

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def flax_parts(tiny_model_dir):
    """The tiny model's tokenizers and scheduler state as diffusers and transformers load them."""
    from diffusers import FlaxEulerDiscreteScheduler
    from transformers import CLIPTokenizer

    silence_library_noise()
    tokenizers = [
        CLIPTokenizer.from_pretrained(str(tiny_model_dir / t)) for t in ("tokenizer", "tokenizer_2")
    ]
    _, state = FlaxEulerDiscreteScheduler.from_pretrained(str(tiny_model_dir / "scheduler"))
    return tokenizers, state


def load(source, model_configs=None, dtype=jnp.float32):
    silence_library_noise()
    return load_pipeline(str(source), model_configs and str(model_configs), dtype=dtype, split_head_dim=False)


def assert_same_params(params, tiny_model_dir, *, through=None):
    for component in COMPONENTS:
        loaded = flatten_dict(params[component])
        expected = flatten_dict(read_flax_params(tiny_model_dir, component))
        assert sorted(loaded) == sorted(expected), component
        for path, value in expected.items():
            want = value if through is None else value.astype(through).astype(np.float32)
            assert loaded[path].dtype == np.float32, path
            assert np.array_equal(loaded[path], want), f"{component}: {'/'.join(path)} differs"


def assert_same_pipeline(pipeline, params, flax_parts):
    tokenizers, scheduler_state = flax_parts
    prompt = "a photo of a cat"  # tokenizer_2 pads differently from tokenizer in real SDXL: both compared
    for ours, theirs in zip((pipeline.tokenizer, pipeline.tokenizer_2), tokenizers, strict=True):
        assert ours(prompt, padding="max_length").input_ids == theirs(prompt, padding="max_length").input_ids
    assert np.array_equal(params["scheduler"].common.alphas_cumprod, scheduler_state.common.alphas_cumprod)
    assert pipeline.scheduler.config.timestep_spacing == "leading"


def test_a_pytorch_layout_folder_loads_to_the_flax_parameters(pytorch_folder, tiny_model_dir, flax_parts):
    pipeline, params = load(pytorch_folder)
    assert_same_params(params, tiny_model_dir)
    assert_same_pipeline(pipeline, params, flax_parts)


def test_a_single_file_loads_to_the_flax_parameters(single_file, tiny_model_dir, flax_parts):
    pipeline, params = load(single_file, model_configs=tiny_model_dir)
    assert_same_params(params, tiny_model_dir)
    assert_same_pipeline(pipeline, params, flax_parts)


def test_a_bfloat16_sharded_variant_release_loads_cast_to_the_parameter_dtype(tiny_model_dir, tmp_path):
    """As large fine-tunes are published: half-precision `.bf16` variant files, the UNet in shards."""
    import json

    import ml_dtypes
    from safetensors.numpy import load_file, save_file

    folder = write_pytorch_folder(
        tiny_model_dir, tmp_path / "bf16", dtype=ml_dtypes.bfloat16, variant=".bf16"
    )
    unet = folder / "unet"
    whole = unet / "diffusion_pytorch_model.bf16.safetensors"
    state = load_file(str(whole))
    whole.unlink()
    names = sorted(state)
    weight_map = {}
    for number, shard_names in enumerate((names[::2], names[1::2]), start=1):
        file_name = f"diffusion_pytorch_model.bf16-0000{number}-of-00002.safetensors"
        save_file({n: state[n] for n in shard_names}, str(unet / file_name))
        weight_map.update(dict.fromkeys(shard_names, file_name))
    index = {"metadata": {}, "weight_map": weight_map}
    (unet / "diffusion_pytorch_model.bf16.safetensors.index.json").write_text(json.dumps(index))

    _, params = load(folder)
    assert_same_params(params, tiny_model_dir, through=ml_dtypes.bfloat16)
