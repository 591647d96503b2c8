"""A real server started on a PyTorch-layout diffusers folder serves the Flax-format model's images.

The folder is the tiny model written as PyTorch pipelines save it (sdxl_test_support.checkpoint_writers:
safetensors, OIHW convolutions, PyTorch class names); `sdxl-server serve --model FOLDER` loads it without
PyTorch. Each image must equal the shared server's (the tiny model's Flax folder) within one level of 255.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from sdxl_client import Client
from sdxl_test_support.checkpoint_writers import write_pytorch_folder

SERVE = (sys.executable, "-m", "sdxl_server.main", "serve")


@pytest.mark.slow
def test_a_pytorch_layout_folder_serves_the_flax_models_images(
    server_factory, shared_server, tiny_model_dir, tmp_path
):
    folder = write_pytorch_folder(tiny_model_dir, tmp_path / "pytorch-folder")
    assert not list(folder.rglob("*.msgpack"))  # nothing Flax left to fall back on
    # One of the shared server's resolutions: its compiled programs are loaded, not compiled again.
    server = server_factory("--model", str(folder), "--resolutions", "64x64")
    requests = [
        {"prompt": "a watercolor fox", "seed": 21, "steps": 3},
        {"prompt": "a lighthouse", "negative_prompt": "fog", "seed": 5, "steps": 2, "num_images": 2},
    ]
    with Client(server.target, timeout=120) as served, Client(shared_server.target, timeout=120) as flax:
        for arguments in requests:
            ours = served.generate(**arguments, width=64, height=64, format="png").images
            theirs = flax.generate(**arguments, width=64, height=64, format="png").images
            assert len(ours) == len(theirs) == arguments.get("num_images", 1)
            for mine, reference in zip(ours, theirs, strict=True):
                a = np.asarray(mine.to_pil().convert("RGB"), np.int32)
                b = np.asarray(reference.to_pil().convert("RGB"), np.int32)
                assert a.shape == (64, 64, 3)
                assert np.abs(a - b).max() <= 1, arguments
                assert a.std() > 0  # an image, not a constant any two broken loads would share


def test_an_incomplete_folder_fails_at_start_naming_the_component_and_file(tiny_model_dir, tmp_path):
    folder = write_pytorch_folder(tiny_model_dir, tmp_path / "pytorch-folder")
    (folder / "text_encoder_2" / "model.safetensors").unlink()
    done = subprocess.run(
        [*SERVE, "--model", str(folder), "--port", "0", "--metrics-port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"sdxl-server serve: error: --model: model folder {folder} is incomplete: text_encoder_2 needs "
        "text_encoder_2/model.safetensors (or a variant such as .fp16.safetensors, or a sharded "
        ".safetensors.index.json)"
    ]
