"""What a model path holds, and the files each component needs from a diffusers folder.

A diffusers SDXL folder has one subfolder per component: unet/, vae/, text_encoder/, text_encoder_2/
(each a config and weights), tokenizer/, tokenizer_2/ and scheduler/. Its weights are either Flax
(`*.msgpack`, loaded by diffusers itself) or PyTorch-layout safetensors (`*.safetensors`, possibly
sharded with an `.index.json`, possibly only the `.fp16` variant), which checkpoints/ converts. A missing
file is reported by component and path, before anything is loaded.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from sdxl_server.engine.models.checkpoints.checkpoint_errors import CheckpointError, IncompleteCheckpoint

FLAX_FOLDER = "flax-folder"
PYTORCH_FOLDER = "pytorch-folder"
SINGLE_FILE = "single-file"
HUB_ID = "hub-id"

# Component -> (PyTorch weights' file stem, Flax weights' file name).
WEIGHT_FILES = {
    "unet": ("diffusion_pytorch_model", "diffusion_flax_model.msgpack"),
    "vae": ("diffusion_pytorch_model", "diffusion_flax_model.msgpack"),
    "text_encoder": ("model", "flax_model.msgpack"),
    "text_encoder_2": ("model", "flax_model.msgpack"),
}
# What CLIPTokenizer needs; tokenizer_config.json (pad token, length) is read when present.
TOKENIZER_FILES = ("vocab.json", "merges.txt")
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"


@dataclasses.dataclass(frozen=True)
class FolderFiles:
    """The files of a complete diffusers folder; `weights` is empty for a folder of configs only."""

    root: Path
    configs: dict[str, Path]  # unet, vae, text_encoder, text_encoder_2, scheduler
    tokenizers: dict[str, Path]  # tokenizer, tokenizer_2: their directories
    weights: dict[str, list[Path]]  # unet, vae, text_encoder, text_encoder_2: safetensors files


def detect_format(source: str) -> str:
    """FLAX_FOLDER, PYTORCH_FOLDER, SINGLE_FILE or HUB_ID (anything that is not a local path)."""
    path = Path(source).expanduser()
    if path.is_file():
        if path.name.endswith(".safetensors"):
            return SINGLE_FILE
        raise CheckpointError(
            f"{path} is not a .safetensors file: only safetensors checkpoints can be read without "
            "PyTorch (.ckpt and .bin files are Python pickles; convert them to safetensors first)"
        )
    if not path.is_dir():
        if path.is_absolute() or source.startswith(("./", "../", "~")):
            raise CheckpointError(f"model path {path} does not exist")
        return HUB_ID
    flax = [(path / name / files[1]).is_file() for name, files in WEIGHT_FILES.items()]
    pytorch = [_pytorch_weights(path, name) is not None for name in WEIGHT_FILES]
    if all(flax):
        return FLAX_FOLDER
    if any(pytorch) or not any(flax):
        return PYTORCH_FOLDER
    return FLAX_FOLDER


def folder_files(root: Path, *, kind: str | None) -> FolderFiles:
    """The files of `root` as a diffusers folder of `kind` (PYTORCH_FOLDER, FLAX_FOLDER, or None for
    configs and tokenizers only). Raises IncompleteCheckpoint naming the first component that lacks a file."""
    root = Path(root)
    where = str(root)
    if not root.is_dir():
        raise CheckpointError(f"{root} is not a directory")
    if kind is not None and not (root / "model_index.json").is_file():
        raise IncompleteCheckpoint(where, "the pipeline", "model_index.json")
    configs: dict[str, Path] = {}
    weights: dict[str, list[Path]] = {}
    for component, (stem, flax_name) in WEIGHT_FILES.items():
        configs[component] = _require(root, component, f"{component}/config.json")
        if kind == FLAX_FOLDER:
            _require(root, component, f"{component}/{flax_name}")
        elif kind == PYTORCH_FOLDER:
            weights[component] = _require_pytorch_weights(root, component, stem)
    configs["scheduler"] = _require(root, "scheduler", SCHEDULER_CONFIG)
    tokenizers = {}
    for tokenizer in ("tokenizer", "tokenizer_2"):
        for name in TOKENIZER_FILES:
            _require(root, tokenizer, f"{tokenizer}/{name}")
        tokenizers[tokenizer] = root / tokenizer
    return FolderFiles(root=root, configs=configs, tokenizers=tokenizers, weights=weights)


def _require(root: Path, component: str, relative: str) -> Path:
    path = root / relative
    if not path.is_file():
        raise IncompleteCheckpoint(str(root), component, relative)
    return path


def _pytorch_weights(root: Path, component: str) -> list[Path] | None:
    """The component's safetensors files: the plain name first, then a variant (`.fp16`, `.bf16`, ...);
    a sharded checkpoint through its index."""
    stem = WEIGHT_FILES[component][0]
    directory = root / component
    variants = sorted(
        {p.name[len(stem) : -len(".safetensors")] for p in directory.glob(f"{stem}.*.safetensors")}
        | {
            p.name[len(stem) : -len(".safetensors.index.json")]
            for p in directory.glob(f"{stem}.*.safetensors.index.json")
        },
        key=lambda variant: (variant != ".fp16", variant),
    )
    for variant in ("", *variants):
        single = directory / f"{stem}{variant}.safetensors"
        if single.is_file():
            return [single]
        index = directory / f"{stem}{variant}.safetensors.index.json"
        if index.is_file():
            from sdxl_server.engine.models.checkpoints.tensor_files import shard_paths

            return shard_paths(index)
    return None


def _require_pytorch_weights(root: Path, component: str, stem: str) -> list[Path]:
    found = _pytorch_weights(root, component)
    wanted = f"{component}/{stem}.safetensors"
    if found is None:
        pickles = [p for p in (root / component).glob(f"{stem}*.bin") if p.is_file()]
        detail = (
            f"found {pickles[0].relative_to(root)}, a PyTorch pickle, which cannot be read without "
            "PyTorch: convert it to safetensors"
            if pickles
            else "or a variant such as .fp16.safetensors, or a sharded .safetensors.index.json"
        )
        raise IncompleteCheckpoint(str(root), component, wanted, detail)
    for shard in found:
        if not shard.is_file():
            raise IncompleteCheckpoint(
                str(root), component, str(shard.relative_to(root)), "a shard its index names"
            )
    return found
