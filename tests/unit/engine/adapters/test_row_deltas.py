"""Different adapters per UNet row: the tiny UNet run once on rows that use adapter X, none, and X
stacked with Y gives, row by row, what the UNet gives with those adapters merged into its weights by
hand (sdxl_test_support.lora_writers: W + s * alpha/rank * up @ down). Tolerance: float32 rounding of
two ways of summing the same products (1e-4 on outputs of order 1).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sdxl_server.engine.adapters.adapter_bank import BankLayout
from sdxl_server.engine.adapters.layer_names import layer_names_of
from sdxl_server.engine.adapters.lora_file import read_lora_file
from sdxl_server.engine.adapters.row_deltas import row_adapters
from sdxl_test_support.checkpoint_writers import read_flax_params
from sdxl_test_support.lora_writers import (
    WrittenLayer,
    merged_flax_params,
    random_layers,
    write_diffusers,
    write_kohya,
)

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from diffusers import FlaxUNet2DConditionModel
    from sdxl_server.engine.models.quiet_libraries import silence_library_noise

    silence_library_noise()
    unet, params = FlaxUNet2DConditionModel.from_pretrained(str(tiny_model_dir / "unet"))
    all_params = {c: read_flax_params(tiny_model_dir, c) for c in COMPONENTS}
    names = layer_names_of(all_params, json.loads((tiny_model_dir / "unet" / "config.json").read_text()))
    return unet, params, names


def _unet_inputs(rows: int):
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    return (
        jax.random.normal(keys[0], (rows, 4, 8, 8)),
        jnp.array([999, 500, 20][:rows], jnp.int32),
        jax.random.normal(keys[1], (rows, 77, 64)),
        {
            "text_embeds": jax.random.normal(keys[2], (rows, 32)),
            "time_ids": jax.random.normal(keys[3], (rows, 6)),
        },
    )


def _jitted(unet):
    """A fresh jitted UNet call: traced at its first call, so one first called inside an active
    row_adapters applies the rows' adapters (and one first called outside it never does)."""

    def call(params, sample, timesteps, context, added):
        return unet.apply({"params": params}, sample, timesteps, context, added_cond_kwargs=added).sample

    return jax.jit(call)


def _apply(unet, params, inputs):
    return _jitted(unet)(params, *inputs)


@pytest.mark.slow
def test_each_row_equals_the_unet_with_its_adapters_merged(model, tiny_model_dir, tmp_path):
    unet, params, names = model
    x_layers = random_layers(tiny_model_dir, rank=4, seed=1, components=("unet",))
    y_layers = random_layers(tiny_model_dir, rank=2, alpha=1.0, seed=2, components=("unet",), every=2)
    x = read_lora_file(write_kohya(tiny_model_dir, x_layers, tmp_path / "x.safetensors"), names).load()
    y = read_lora_file(write_diffusers(tiny_model_dir, y_layers, tmp_path / "y.safetensors"), names).load()

    layout = BankLayout.of(names, "unet", places=3, max_rank=4)
    bank = layout.empty()
    for place, layers in ((1, x), (2, y)):
        for module, (down, up) in layout.place(layers).items():
            bank[module][0][place], bank[module][1][place] = down, up
    device_bank = {module: (jnp.asarray(d), jnp.asarray(u)) for module, (d, u) in bank.items()}

    # Row 0: X at 0.8; row 1: nothing (place 0 is empty); row 2: X at 0.5 stacked with Y at -1.
    places = jnp.array([[1, 0], [0, 0], [1, 2]], jnp.int32)
    scales = jnp.array([[0.8, 0.0], [0.0, 0.0], [0.5, -1.0]], jnp.float32)
    inputs = _unet_inputs(3)
    with row_adapters(device_bank, places, scales):
        batched = np.asarray(_apply(unet, params, inputs))

    # x_layers stored as float16 by the kohya writer; y as float32 by the diffusers writer.
    merges = [[(x_layers, 0.8)], [], [(x_layers, 0.5), (y_layers, -1.0)]]
    base = np.asarray(_apply(unet, params, inputs))
    one_row_unet = _jitted(unet)  # compiled once for the three rows: their merged weights are arguments
    for row, stacked in enumerate(merges):
        merged = params
        for layers, scale in stacked:
            dtype = np.float16 if layers is x_layers else np.float32
            merged = merged_flax_params({"unet": merged}, [(layers, scale)], dtype=dtype)["unet"]
        one_row = jax.tree_util.tree_map(lambda a, r=row: a[r : r + 1], inputs)
        expected = np.asarray(one_row_unet(merged, *one_row))[0]
        np.testing.assert_allclose(batched[row], expected, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(batched[1], base[1], atol=1e-6)  # no adapter: the base UNet's row
    assert np.abs(batched[0] - base[0]).max() > 1e-2  # the adapter does change its row


def test_adapters_the_bank_cannot_hold_are_refused_with_the_reason(model, tiny_model_dir, tmp_path):
    _, _, names = model
    layout = BankLayout.of(names, "unet", places=2, max_rank=4)
    ordinary = random_layers(tiny_model_dir, rank=4, seed=3, components=("unet",))
    path = write_kohya(tiny_model_dir, ordinary, tmp_path / "ok.safetensors")
    assert layout.problem(read_lora_file(path, names)) is None

    locon = random_layers(tiny_model_dir, rank=2, seed=4, components=("unet",), convolutions=True)
    path = write_kohya(tiny_model_dir, locon, tmp_path / "locon.safetensors")
    assert "convolution (LoCon)" in layout.problem(read_lora_file(path, names))

    high = random_layers(tiny_model_dir, rank=8, seed=5, components=("unet",))
    path = write_kohya(tiny_model_dir, high, tmp_path / "high.safetensors")
    assert "rank 8 is above the adapter bank's maximum 4" in layout.problem(read_lora_file(path, names))

    # A resnet's time projection: linear, but outside the transformers the bank covers.
    rng = np.random.default_rng(6)
    time_projection = WrittenLayer(
        "unet",
        ("down_blocks_0", "resnets_0", "time_emb_proj", "kernel"),
        rng.normal(0, 0.1, (2, 128)).astype(np.float32),
        rng.normal(0, 0.1, (32, 2)).astype(np.float32),
        2.0,
    )
    path = write_kohya(tiny_model_dir, [*ordinary, time_projection], tmp_path / "outside.safetensors")
    assert "outside the layers per-request adapters cover" in layout.problem(read_lora_file(path, names))
    assert layout.bytes_per_place(4) == sum((i + o) * 4 * 4 for i, o in layout.shapes)
