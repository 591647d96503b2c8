"""LoRA files in both published formats read onto the tiny model's Flax parameters, and refusals.

The files come from sdxl_test_support.lora_writers (written from the formats' definitions); each layer
the reader returns must be the written layer's change, computed by the test, at the written kernel.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import save_file
from sdxl_server.engine.adapters.fusing import merge_layers
from sdxl_server.engine.adapters.layer_names import layer_names_of
from sdxl_server.engine.adapters.lora_file import AdapterError, read_lora_file
from sdxl_test_support.checkpoint_writers import read_flax_params
from sdxl_test_support.lora_writers import (
    flax_delta,
    merged_flax_params,
    random_layers,
    write_diffusers,
    write_kohya,
)

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def tiny_params(tiny_model_dir):
    return {component: read_flax_params(tiny_model_dir, component) for component in COMPONENTS}


@pytest.fixture(scope="module")
def names(tiny_model_dir, tiny_params):
    config = json.loads((tiny_model_dir / "unet" / "config.json").read_text())
    return layer_names_of(tiny_params, config)


def _write(kind, tiny_model_dir, layers, path):
    if kind == "kohya":
        return write_kohya(tiny_model_dir, layers, path)
    if kind == "kohya-original-unet-names":
        return write_kohya(tiny_model_dir, layers, path, original_unet_names=True)
    if kind == "diffusers-peft":
        return write_diffusers(tiny_model_dir, layers, path, spelling="peft")
    return write_diffusers(tiny_model_dir, layers, path, spelling="lora.down")


@pytest.mark.parametrize(
    "kind", ["kohya", "kohya-original-unet-names", "diffusers-peft", "diffusers-lora.down"]
)
def test_every_written_layer_is_read_onto_its_kernel(kind, tiny_model_dir, names, tmp_path):
    layers = random_layers(tiny_model_dir, rank=4, alpha=2.0, seed=1)
    path = _write(kind, tiny_model_dir, layers, tmp_path / f"{kind}.safetensors")
    stored = np.float16 if kind.startswith("kohya") else np.float32

    read = read_lora_file(path, names)
    assert read.rank == 4
    assert set(read.components) == set(COMPONENTS)
    loaded = {(layer.component, layer.kernel): layer for layer in read.load()}
    assert len(loaded) == len(layers) > 50  # attention, feed-forward and projections of all three
    for written in layers:
        got = loaded[(written.component, written.flax_kernel)]
        np.testing.assert_allclose(got.delta(), flax_delta(written, dtype=stored), rtol=1e-5, atol=1e-6)


def test_without_alpha_the_scale_is_one(tiny_model_dir, names, tmp_path):
    layers = random_layers(tiny_model_dir, rank=3, alpha=3.0, seed=2, components=("unet",))
    path = write_diffusers(tiny_model_dir, layers, tmp_path / "peft.safetensors", with_alpha=False)
    loaded = read_lora_file(path, names).load()
    assert {layer.alpha for layer in loaded} == {3.0}
    np.testing.assert_allclose(loaded[0].delta(), flax_delta(layers[0]), rtol=1e-5, atol=1e-6)


def test_convolution_layers_locon_are_read(tiny_model_dir, names, tmp_path):
    layers = random_layers(tiny_model_dir, rank=2, seed=3, components=("unet",), convolutions=True)
    convolutions = [layer for layer in layers if layer.down.ndim == 4]
    assert convolutions
    path = write_kohya(tiny_model_dir, layers, tmp_path / "locon.safetensors", original_unet_names=True)
    loaded = {layer.kernel: layer for layer in read_lora_file(path, names).load()}
    for written in convolutions:
        np.testing.assert_allclose(
            loaded[written.flax_kernel].delta(), flax_delta(written, dtype=np.float16), rtol=1e-5, atol=1e-6
        )


def test_merging_equals_the_hand_merge(tiny_model_dir, names, tiny_params, tmp_path):
    layers = random_layers(tiny_model_dir, rank=4, seed=4, convolutions=True)
    path = write_diffusers(tiny_model_dir, layers, tmp_path / "merge.safetensors")
    merged = merge_layers(dict(tiny_params), read_lora_file(path, names).load(), 0.7)
    expected = merged_flax_params(tiny_params, [(layers, 0.7)])
    from flax.traverse_util import flatten_dict

    for component in COMPONENTS:
        got, want = flatten_dict(merged[component]), flatten_dict(expected[component])
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_allclose(np.asarray(got[key]), np.asarray(want[key]), rtol=1e-5, atol=1e-6)
    first = layers[0]
    before = flatten_dict(tiny_params[first.component])[first.flax_kernel]
    assert not np.allclose(flatten_dict(merged[first.component])[first.flax_kernel], before)


def _refusal(path, names) -> str:
    with pytest.raises(AdapterError) as refused:
        read_lora_file(path, names)
    return str(refused.value)


def test_malformed_and_mismatched_files_are_refused_with_the_reason(tiny_model_dir, names, tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    assert "not a readable safetensors file" in _refusal(garbage, names)

    empty = tmp_path / "empty.safetensors"
    save_file({}, str(empty))
    assert "holds no tensors" in _refusal(empty, names)

    # An SD 1.5 adapter: SDXL has no attention in its first down block.
    other_model = tmp_path / "sd15.safetensors"
    prefix = "lora_unet_down_blocks_0_attentions_0_proj_in"
    save_file(
        {
            f"{prefix}.lora_down.weight": np.zeros((4, 32), np.float16),
            f"{prefix}.lora_up.weight": np.zeros((32, 4), np.float16),
        },
        str(other_model),
    )
    message = _refusal(other_model, names)
    assert "match no layer of the model" in message and "down_blocks_0_attentions_0_proj_in" in message

    layer = random_layers(tiny_model_dir, rank=4, seed=5, components=("unet",))[0]
    wrong = type(layer)(layer.component, layer.flax_kernel, layer.down[:, :-1], layer.up, layer.alpha)
    message = _refusal(write_kohya(tiny_model_dir, [wrong], tmp_path / "wrong.safetensors"), names)
    assert "do not fit" in message and "/".join(layer.flax_kernel[:-1]) in message

    half = tmp_path / "half.safetensors"
    save_file({"unet.mid_block.attentions_0.proj_in.lora_A.weight": np.zeros((4, 64), np.float32)}, str(half))
    assert "has no up weight" in _refusal(half, names)

    loha = tmp_path / "loha.safetensors"
    save_file(
        {"lora_unet_mid_block_attentions_0_proj_in.hada_w1_a": np.zeros((64, 4), np.float32)}, str(loha)
    )
    assert "another kind of adapter" in _refusal(loha, names)

    foreign = tmp_path / "foreign.safetensors"
    save_file({"model.diffusion_model.out.2.weight": np.zeros((4,), np.float32)}, str(foreign))
    assert "not a LoRA tensor" in _refusal(foreign, names)
