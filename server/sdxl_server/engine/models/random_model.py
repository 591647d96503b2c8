"""A published SDXL architecture with random weights, in diffusers Flax format, for measuring real-size
cost (compile, step, decode, memory) where the weights cannot be downloaded.

`sdxl-server build-random-model --arch sdxl-base DIR` writes SDXL 1.0 base's configs (architectures/) and
random bfloat16 weights, loadable through `FlaxStableDiffusionXLPipeline.from_pretrained` like real ones.
The tokenizers are the project's byte-level CLIP tokenizer (tiny_model.py; the real BPE vocabulary is a
download): its ids fit the real encoders' 49,408-entry embeddings, and its end token still has the
largest id, where Flax CLIP pools.

A jitted `init_weights` of the full UNet compiles a forward pass (more than this machine's memory); so
only the parameter shapes are traced (`jax.eval_shape`) and the values drawn with numpy, leaf by leaf.
The images are noise; only their cost is real.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from sdxl_server.engine.models.architectures import sdxl_base

ARCHITECTURES = {sdxl_base.NAME: sdxl_base}
COMPLETION_MARKER = ".random-model-complete"


def build_random_model(arch: str, directory: Path, seed: int = 0) -> Path:
    """Writes `arch` with random bfloat16 weights into `directory` (replaced atomically when complete)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"--arch: unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    spec = ARCHITECTURES[arch]
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.building-", dir=directory.parent))
    try:
        _write(spec, staging, np.random.default_rng(seed))
        (staging / COMPLETION_MARKER).write_text(f"{arch}\n")
        shutil.rmtree(directory, ignore_errors=True)
        staging.rename(directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def _write(spec: Any, directory: Path, rng: np.random.Generator) -> None:
    from diffusers import FlaxAutoencoderKL, FlaxUNet2DConditionModel
    from transformers import CLIPTextConfig, FlaxCLIPTextModel, FlaxCLIPTextModelWithProjection

    from sdxl_server.engine.models.tiny_model import _write_tokenizer

    for name in ("tokenizer", "tokenizer_2"):
        _write_tokenizer(directory / name)
    (directory / "model_index.json").write_text(json.dumps(_flax_model_index(spec.MODEL_INDEX), indent=2))
    scheduler_dir = directory / "scheduler"
    scheduler_dir.mkdir()
    (scheduler_dir / "scheduler_config.json").write_text(json.dumps(spec.SCHEDULER, indent=2))

    unet: Any = FlaxUNet2DConditionModel.from_config(_diffusers_config(spec.UNET))
    unet.save_pretrained(directory / "unet", params=_random_params(unet.init_weights, rng))
    vae: Any = FlaxAutoencoderKL.from_config(_diffusers_config(spec.VAE))
    vae.save_pretrained(directory / "vae", params=_random_params(vae.init_weights, rng))
    for name, config, model_class in (
        ("text_encoder", spec.TEXT_ENCODER, FlaxCLIPTextModel),
        ("text_encoder_2", spec.TEXT_ENCODER_2, FlaxCLIPTextModelWithProjection),
    ):
        model: Any = model_class(CLIPTextConfig(**config), _do_init=False)
        params = _random_params(lambda key, m=model: m.init_weights(key, (1, 77)), rng)
        model.save_pretrained(directory / name, params=params)


def _diffusers_config(config: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in config.items() if not key.startswith("_")}


def _flax_model_index(index: dict[str, Any]) -> dict[str, Any]:
    """The PyTorch pipeline's index, naming the Flax classes from_pretrained loads here."""
    flax = dict(index, _class_name="FlaxStableDiffusionXLPipeline")
    for component, (library, class_name) in list((k, v) for k, v in index.items() if isinstance(v, list)):
        if class_name.startswith(("CLIPTokenizer",)):
            continue
        flax[component] = [library, f"Flax{class_name}"]
    return flax


def _random_params(init_weights: Any, rng: np.random.Generator) -> dict[str, Any]:
    """Random bfloat16 leaves with the structure `init_weights(key)` would give (shapes traced only):
    kernels scaled by 1/sqrt(fan-in) so activations keep unit scale, norms the identity, biases zero."""
    import jax
    import ml_dtypes
    from flax.core.frozen_dict import unfreeze
    from flax.traverse_util import flatten_dict, unflatten_dict

    flat = flatten_dict(unfreeze(jax.eval_shape(init_weights, jax.random.PRNGKey(0))))
    values = {}
    for path, leaf in sorted(flat.items()):
        name = path[-1]
        if name == "scale":
            value = np.ones(leaf.shape, np.float32)
        elif name == "bias":
            value = np.zeros(leaf.shape, np.float32)
        elif name in ("kernel", "embedding"):
            fan_in = math.prod(leaf.shape[:-1]) if name == "kernel" else 1
            value = rng.standard_normal(leaf.shape, dtype=np.float32) / np.float32(math.sqrt(fan_in or 1))
        else:
            raise ValueError(f"no initialisation rule for parameter {'/'.join(map(str, path))}")
        values[path] = value.astype(ml_dtypes.bfloat16)
    return unflatten_dict(values)
