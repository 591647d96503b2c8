"""Loading adapters into the device bank reuses one compiled program whatever the adapter and the place,
and writes exactly that place."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sdxl_server.engine.adapters.adapter_bank import BankLayout
from sdxl_server.engine.adapters.device_bank import empty_device_bank, load_into_place, write_place
from sdxl_server.engine.adapters.layer_names import layer_names_of
from sdxl_server.engine.adapters.lora_file import read_lora_file
from sdxl_test_support.checkpoint_writers import read_flax_params
from sdxl_test_support.lora_writers import random_layers, write_diffusers, write_kohya


@pytest.fixture(scope="module")
def names(tiny_model_dir):
    params = {c: read_flax_params(tiny_model_dir, c) for c in ("unet", "text_encoder", "text_encoder_2")}
    return layer_names_of(params, json.loads((tiny_model_dir / "unet" / "config.json").read_text()))


def test_loading_any_adapter_into_any_place_never_recompiles(names, tiny_model_dir, tmp_path):
    layout = BankLayout.of(names, "unet", places=3, max_rank=8)
    small = random_layers(tiny_model_dir, rank=2, seed=1, components=("unet",), every=3)
    large = random_layers(tiny_model_dir, rank=8, seed=2, components=("unet",))
    adapters = [
        read_lora_file(write_kohya(tiny_model_dir, small, tmp_path / "small.safetensors"), names).load(),
        read_lora_file(write_diffusers(tiny_model_dir, large, tmp_path / "large.safetensors"), names).load(),
    ]
    bank = empty_device_bank(layout, np.float32)
    compiled_before = write_place._cache_size()
    for place, layers in ((2, adapters[0]), (0, adapters[1]), (2, adapters[1])):
        bank = load_into_place(bank, place, layout.place(layers))
    assert write_place._cache_size() - compiled_before <= 1  # one program for every load

    expected = layout.place(adapters[1])
    for module, (down, up) in bank.items():
        np.testing.assert_array_equal(np.asarray(down[0]), expected[module][0])
        np.testing.assert_array_equal(np.asarray(down[2]), expected[module][0])  # rewritten in place
        np.testing.assert_array_equal(np.asarray(up[2]), expected[module][1])
        assert not np.asarray(down[1]).any() and not np.asarray(up[1]).any()  # untouched place
