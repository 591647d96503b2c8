"""The bench-size model: the tiny SDXL with a wider, deeper UNet, so that device time dominates.

With the tiny model a step takes a few milliseconds and the host's per-dispatch overhead is a visible
share of it; with real SDXL a step is ~100 ms on a TPU and that overhead vanishes. This model sits in
between on a 2-core CPU: its text encoders, tokenizers, VAE and scheduler are the tiny model's (copied),
its UNet has 3 levels of widths 64/128/256 with 2 layers per level (about 40x the tiny UNet's compute).
Random weights, built once into a cache directory and loaded through `from_pretrained` like any model.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from sdxl_server.engine.models.tiny_model import ensure_tiny_model

COMPLETION_MARKER = ".bench-sdxl-v1-complete"
COPIED = (
    "scheduler",
    "text_encoder",
    "text_encoder_2",
    "tokenizer",
    "tokenizer_2",
    "vae",
    "model_index.json",
)


def unet_config() -> dict[str, Any]:
    return dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(64, 128, 256),
        layers_per_block=2,
        attention_head_dim=(2, 4, 8),  # diffusers reads this as the number of heads
        transformer_layers_per_block=(1, 1, 1),
        cross_attention_dim=64,  # the tiny text encoders: 32 + 32
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,
    )


def vae_config_with_real_decode_cost() -> dict[str, Any]:
    """A VAE whose decoder is wide enough (32/64/64/64) that decoding one 128x128 image costs more than
    one guided step of the bench UNet (about 1.6x here), as SDXL's decode at 1024x1024 costs about 0.77 of
    a guided step in FLOPs and usually more in time: with the tiny VAE the decode would look free."""
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 64, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=128,
        scaling_factor=0.13025,
    )


def ensure_bench_model(directory: Path, tiny_model_dir: Path, heavy_vae: bool = False) -> Path:
    """The bench model in `directory`; `heavy_vae` swaps in vae_config_with_real_decode_cost()."""
    directory = Path(directory)
    if (directory / COMPLETION_MARKER).exists():
        return directory
    tiny = ensure_tiny_model(Path(tiny_model_dir))
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.building-", dir=directory.parent))
    try:
        for name in COPIED:
            if heavy_vae and name == "vae":
                continue
            source = tiny / name
            if source.is_dir():
                shutil.copytree(source, staging / name)
            else:
                shutil.copy2(source, staging / name)
        _write_unet(staging / "unet")
        if heavy_vae:
            _write_heavy_vae(staging / "vae")
        (staging / COMPLETION_MARKER).write_text("complete\n")
        shutil.rmtree(directory, ignore_errors=True)
        staging.rename(directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def prepare_side_by_side(devices: int) -> Path:
    """What every side-by-side benchmark does before its engines: quiets the libraries' noise, refuses in
    one line to run on fewer than `devices` local devices, and builds the heavy-VAE bench model (once).
    Returns the model's directory."""
    import jax
    from sdxl_server.engine.models.quiet_libraries import silence_library_noise

    from bench.paths import HEAVY_VAE_BENCH_MODEL_DIR, TINY_MODEL_DIR

    silence_library_noise()
    if jax.local_device_count() < devices:
        raise SystemExit(
            f"needs {devices} devices (XLA_FLAGS=--xla_force_host_platform_device_count={devices})"
        )
    return ensure_bench_model(HEAVY_VAE_BENCH_MODEL_DIR, TINY_MODEL_DIR, heavy_vae=True)


def _write_heavy_vae(directory: Path) -> None:
    from diffusers import FlaxAutoencoderKL

    vae: Any = FlaxAutoencoderKL(**vae_config_with_real_decode_cost())
    vae.save_pretrained(directory, params=_random_params(vae.init_weights, seed=1))


def _random_params(init_weights: Any, seed: int) -> Any:
    """Random leaves shaped like `init_weights` gives (traced only): kernels and embeddings scaled to
    keep unit-scale activations, norms the identity, biases zero."""
    import jax
    from flax.core.frozen_dict import unfreeze
    from flax.traverse_util import flatten_dict, unflatten_dict

    shapes = flatten_dict(unfreeze(jax.eval_shape(init_weights, jax.random.PRNGKey(0))))
    rng = np.random.default_rng(seed)
    params = {}
    for path, leaf in shapes.items():
        if path[-1] == "scale":
            params[path] = np.ones(leaf.shape, leaf.dtype)
        elif path[-1] == "bias":
            params[path] = np.zeros(leaf.shape, leaf.dtype)
        else:
            fan_in = math.prod(leaf.shape[:-1]) or 1
            params[path] = (rng.standard_normal(leaf.shape) / math.sqrt(fan_in)).astype(leaf.dtype)
    return unflatten_dict(params)


def _write_unet(directory: Path) -> None:
    from diffusers import FlaxUNet2DConditionModel

    unet: Any = FlaxUNet2DConditionModel(**unet_config())
    unet.save_pretrained(directory, params=_random_params(unet.init_weights, seed=0))
