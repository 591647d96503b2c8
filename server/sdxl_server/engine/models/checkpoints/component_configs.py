"""The configs a checkpoint's weights belong to: from a diffusers folder, or a published architecture.

A diffusers folder brings its own; a single file brings none, so it is read with the configs of a folder
(`--model-configs DIR`: the tiny model's in tests, a fine-tune's own diffusers release) or of an
architecture by name (`sdxl-base`, whose tokenizer vocabularies come from the hub or its local cache).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from sdxl_server.engine.models.checkpoints.checkpoint_errors import CheckpointError
from sdxl_server.engine.models.checkpoints.folder import FolderFiles, folder_files

DEFAULT_ARCHITECTURE = "sdxl-base"
MODEL_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "scheduler")


@dataclasses.dataclass(frozen=True)
class ModelConfigs:
    configs: dict[str, dict[str, Any]]  # MODEL_COMPONENTS -> config.json contents
    tokenizer_dirs: dict[str, Path] | None  # tokenizer, tokenizer_2 -> directory; None: the hub's
    tokenizer_repo: str | None = None  # hub repository with tokenizer/ and tokenizer_2/ subfolders
    origin: str = ""  # for messages

    def load_tokenizers(self) -> tuple[Any, Any]:
        from transformers import CLIPTokenizer

        if self.tokenizer_dirs is not None:
            dirs = self.tokenizer_dirs
            return (
                CLIPTokenizer.from_pretrained(str(dirs["tokenizer"])),
                CLIPTokenizer.from_pretrained(str(dirs["tokenizer_2"])),
            )
        repo = str(self.tokenizer_repo)
        try:  # the local hub cache first: no network, and no minutes of retries where there is none
            return _hub_tokenizers(repo, local_files_only=True)
        except Exception:  # transformers raises OSError, ValueError or TypeError for a cache miss
            pass
        from huggingface_hub import constants

        reason = "HF_HUB_OFFLINE is set"
        if not constants.HF_HUB_OFFLINE:
            try:
                return _hub_tokenizers(repo, local_files_only=False)
            except Exception as error:
                reason = str(error) or type(error).__name__
        raise CheckpointError(
            f"a single-file checkpoint carries no tokenizer, and {self.origin}'s tokenizers ({repo}, "
            f"subfolders tokenizer/ and tokenizer_2/) are neither in the local hub cache nor downloadable "
            f"({reason}). Pass --model-configs DIR, a diffusers folder with the configs and tokenizers"
        ) from None


def _hub_tokenizers(repo: str, *, local_files_only: bool) -> tuple[Any, Any]:
    from transformers import CLIPTokenizer

    return (
        CLIPTokenizer.from_pretrained(repo, subfolder="tokenizer", local_files_only=local_files_only),
        CLIPTokenizer.from_pretrained(repo, subfolder="tokenizer_2", local_files_only=local_files_only),
    )


def configs_of_folder(files: FolderFiles) -> ModelConfigs:
    configs = {}
    for component in MODEL_COMPONENTS:
        path = files.configs[component]
        try:
            configs[component] = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise CheckpointError(f"{path} is not a readable JSON config: {error}") from None
    return ModelConfigs(configs=configs, tokenizer_dirs=dict(files.tokenizers), origin=str(files.root))


def resolve_configs(spec: str | None) -> ModelConfigs:
    """`spec`: a directory of diffusers configs and tokenizers, or an architecture name (None: sdxl-base)."""
    from sdxl_server.engine.models.architectures import ARCHITECTURES, architecture_named
    from sdxl_server.engine.models.checkpoints import check_model_configs

    spec = spec or DEFAULT_ARCHITECTURE
    check_model_configs(spec)
    if spec in ARCHITECTURES:
        module = architecture_named(spec)
        configs = {component: dict(module.CONFIG_FILES[component][1]) for component in MODEL_COMPONENTS}
        return ModelConfigs(
            configs=configs, tokenizer_dirs=None, tokenizer_repo=module.TOKENIZER_REPO, origin=spec
        )
    return configs_of_folder(folder_files(Path(spec).expanduser(), kind=None))
