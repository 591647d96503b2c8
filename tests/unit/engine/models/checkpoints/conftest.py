"""The tiny model written as the checkpoints users have (sdxl_test_support.checkpoint_writers), once."""

from __future__ import annotations

import pathlib

import pytest
from sdxl_test_support.checkpoint_writers import write_pytorch_folder, write_single_file


@pytest.fixture(scope="session")
def pytorch_folder(tiny_model_dir: pathlib.Path, tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return write_pytorch_folder(tiny_model_dir, tmp_path_factory.mktemp("checkpoints") / "pytorch-folder")


@pytest.fixture(scope="session")
def single_file(tiny_model_dir: pathlib.Path, tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return write_single_file(tiny_model_dir, tmp_path_factory.mktemp("checkpoints") / "sdxl.safetensors")
