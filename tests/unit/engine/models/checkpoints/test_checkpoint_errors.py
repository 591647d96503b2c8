"""An incomplete or mismatched checkpoint fails before serving, naming the component and the file."""

from __future__ import annotations

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from sdxl_server.engine.models.checkpoints import CheckpointError, IncompleteCheckpoint, load_pipeline
from sdxl_server.engine.models.checkpoints.component_configs import resolve_configs


def load(source, model_configs=None):
    return load_pipeline(
        str(source), model_configs and str(model_configs), dtype=jnp.float32, split_head_dim=False
    )


@pytest.fixture
def folder_copy(pytorch_folder, tmp_path):
    return shutil.copytree(pytorch_folder, tmp_path / "model")


@pytest.mark.parametrize(
    ("removed", "component"),
    [
        ("unet/diffusion_pytorch_model.safetensors", "unet"),
        ("vae/config.json", "vae"),
        ("text_encoder_2/model.safetensors", "text_encoder_2"),
        ("tokenizer_2/merges.txt", "tokenizer_2"),
        ("scheduler/scheduler_config.json", "scheduler"),
        ("model_index.json", "the pipeline"),
    ],
)
def test_a_missing_file_is_named_with_its_component(folder_copy, removed, component):
    (folder_copy / removed).unlink()
    with pytest.raises(IncompleteCheckpoint) as caught:
        load(folder_copy)
    assert (caught.value.component, caught.value.missing) == (component, removed)
    assert f"{component} needs {removed}" in str(caught.value)
    assert str(folder_copy) in str(caught.value)


def test_pickled_pytorch_weights_are_refused_with_the_way_out(folder_copy):
    weights = folder_copy / "text_encoder" / "model.safetensors"
    weights.rename(folder_copy / "text_encoder" / "pytorch_model.bin")
    (folder_copy / "text_encoder" / "model.bin").write_bytes(b"not read")
    with pytest.raises(IncompleteCheckpoint, match=r"text_encoder/model\.bin, a PyTorch pickle.*convert it"):
        load(folder_copy)


def test_a_flax_folder_missing_its_weights_is_named_too(tiny_model_dir, tmp_path):
    folder = shutil.copytree(tiny_model_dir, tmp_path / "flax")
    (folder / "vae" / "diffusion_flax_model.msgpack").unlink()
    with pytest.raises(IncompleteCheckpoint, match=r"vae needs vae/diffusion_flax_model\.msgpack"):
        load(folder)


def test_a_single_file_without_one_of_the_four_components_is_not_sdxl(single_file, tiny_model_dir, tmp_path):
    state = load_file(str(single_file))
    partial = {
        name: value for name, value in state.items() if not name.startswith("conditioner.embedders.1.")
    }
    save_file(partial, str(tmp_path / "no-openclip.safetensors"))
    with pytest.raises(
        CheckpointError,
        match=r"no text_encoder_2 weights \(no tensor named conditioner\.embedders\.1\.model\.\*\)",
    ):
        load(tmp_path / "no-openclip.safetensors", model_configs=tiny_model_dir)


def test_weights_of_another_architecture_than_the_config_name_the_tensor(folder_copy):
    config_file = folder_copy / "text_encoder_2" / "config.json"
    config = json.loads(config_file.read_text())
    config["projection_dim"] = 16  # the weights' projection is 32 wide
    config_file.write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError, match=r"text_encoder_2: .*text_projection\.weight has shape \(32, 32\)"
    ):
        load(folder_copy)


def test_a_tensor_the_config_has_no_place_for_is_named(folder_copy):
    weights_file = folder_copy / "text_encoder" / "model.safetensors"
    state = load_file(str(weights_file))
    state["text_model.encoder.layers.2.mlp.fc1.weight"] = np.zeros((128, 32), np.float32)  # a third layer
    save_file(state, str(weights_file))
    with pytest.raises(CheckpointError, match=r"text_encoder: .*no place for .*layers\.2\.mlp\.fc1\.weight"):
        load(folder_copy)


def test_unknown_paths_and_formats_are_refused_by_name(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load(tmp_path / "nowhere")
    (tmp_path / "model.ckpt").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match=r"model\.ckpt is not a \.safetensors file"):
        load(tmp_path / "model.ckpt")
    with pytest.raises(CheckpointError, match=r"neither a directory nor an architecture.*sdxl-base"):
        resolve_configs("sdxl-nonexistent")


def test_tokenizers_neither_cached_nor_downloadable_say_how_to_give_them(monkeypatch):
    from huggingface_hub import constants
    from sdxl_server.engine.models.checkpoints.component_configs import ModelConfigs

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # no minutes of retries against no network
    configs = ModelConfigs(
        configs={}, tokenizer_dirs=None, tokenizer_repo="sdxl-serve-tests/no-such-repo", origin="sdxl-base"
    )
    with pytest.raises(
        CheckpointError, match=r"sdxl-base's tokenizers \(sdxl-serve-tests/no-such-repo.*--model-configs DIR"
    ):
        configs.load_tokenizers()
