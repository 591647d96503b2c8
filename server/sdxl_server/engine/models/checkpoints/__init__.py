"""Checkpoints as users have them, loaded into the Flax engine without PyTorch.

`load_pipeline(source, model_configs, ...)` returns what `FlaxStableDiffusionXLPipeline.from_pretrained`
returns, for:
- a diffusers folder with Flax weights, or a hub id: diffusers loads it itself;
- a diffusers folder with PyTorch-layout `*.safetensors` weights (how most SDXL fine-tunes are published);
- one single-file SDXL `.safetensors` (Stability's original layout), read with `model_configs`: a folder
  of diffusers configs and tokenizers, or an architecture name (default "sdxl-base").
The modules: tensor_files (safetensors as numpy), layout (PyTorch layout to Flax parameter trees),
single_file (the original key layout to diffusers names), folder (what a path holds, which file is
missing), component_configs (configs from a folder or an architecture), assemble (the pipeline).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdxl_server.engine.models.checkpoints.checkpoint_errors import CheckpointError, IncompleteCheckpoint
from sdxl_server.engine.models.checkpoints.folder import (
    FLAX_FOLDER,
    HUB_ID,
    PYTORCH_FOLDER,
    SINGLE_FILE,
    detect_format,
    folder_files,
)

__all__ = [
    "SINGLE_FILE",
    "CheckpointError",
    "IncompleteCheckpoint",
    "check_model_configs",
    "check_model_files",
    "detect_format",
    "load_pipeline",
]


def check_model_files(source: str) -> str:
    """The format of `source` (folder.py's constants), after checking that a folder has every file its
    components need. Reads only directory entries (no JAX, no weights): the server calls it before
    starting. Raises CheckpointError (IncompleteCheckpoint naming the component and file)."""
    kind = detect_format(source)
    if kind in (FLAX_FOLDER, PYTORCH_FOLDER):
        folder_files(Path(source).expanduser(), kind=kind)
    return kind


def check_model_configs(spec: str | None) -> None:
    """Raises CheckpointError unless `spec` is a known architecture or a complete folder of configs."""
    from sdxl_server.engine.models.architectures import ARCHITECTURES

    if spec is None or spec in ARCHITECTURES:
        return
    path = Path(spec).expanduser()
    if not path.is_dir():
        known = ", ".join(sorted(ARCHITECTURES))
        raise CheckpointError(f"model configs {spec!r} are neither a directory nor an architecture ({known})")
    folder_files(path, kind=None)


def load_pipeline(
    source: str, model_configs: str | None, *, dtype: Any, split_head_dim: bool
) -> tuple[Any, dict[str, Any]]:
    """(pipeline, params including "scheduler") for any checkpoint `source` (see the module docstring)."""
    kind = check_model_files(source)  # a clear error for a missing file before anything is loaded
    if kind in (FLAX_FOLDER, HUB_ID):
        from diffusers import FlaxStableDiffusionXLPipeline

        return FlaxStableDiffusionXLPipeline.from_pretrained(
            source, dtype=dtype, split_head_dim=split_head_dim
        )

    from sdxl_server.engine.models.checkpoints.assemble import build_pipeline
    from sdxl_server.engine.models.checkpoints.component_configs import configs_of_folder, resolve_configs
    from sdxl_server.engine.models.checkpoints.tensor_files import open_safetensors

    if kind == PYTORCH_FOLDER:
        files = folder_files(Path(source), kind=PYTORCH_FOLDER)
        configs = configs_of_folder(files)
        weights = {
            component: open_safetensors(paths, where=", ".join(str(p.relative_to(files.root)) for p in paths))
            for component, paths in files.weights.items()
        }
    else:
        assert kind == SINGLE_FILE
        from sdxl_server.engine.models.checkpoints.single_file import diffusers_weights

        configs = resolve_configs(model_configs)
        file = open_safetensors([Path(source)], where=Path(source).name)
        weights = diffusers_weights(file, configs.configs["unet"], configs.configs["vae"])
    return build_pipeline(configs, weights, dtype=dtype, split_head_dim=split_head_dim)
