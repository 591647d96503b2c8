"""LoRA adapters for the tiny model, written with numpy in the formats people publish.

Written from the formats' definitions, not from the server's reader (engine/adapters/), so that a naming
or orientation mistake there does not cancel out here:
- kohya / A1111 (sd-scripts' `networks/lora.py`): `lora_unet_<module>` / `lora_te1_<module>` /
  `lora_te2_<module>`, the PyTorch module path with `_` for `.`, each with `.lora_down.weight`
  (rank, in[, kh, kw]), `.lora_up.weight` (out, rank[, 1, 1]) and a scalar `.alpha`. kohya's SDXL
  scripts name UNet modules in the original (sgm) layout (`input_blocks_4_1_...`): `original_unet_names`.
- diffusers / PEFT: `unet.<module>` / `text_encoder.<module>` / `text_encoder_2.<module>` with dots,
  `.lora_A.weight` / `.lora_B.weight` (PEFT) or `.lora.down.weight` / `.lora.up.weight` (diffusers'
  LoRACompatible layers), alpha optional (absent: alpha = rank).
A layer's change is W + scale * alpha / rank * up @ down in PyTorch's orientation; `merged_flax_params`
applies it to the Flax parameters the way a person would by hand: the transpose for a linear kernel,
OIHW -> HWIO for a convolution.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sdxl_test_support.checkpoint_writers import _original_unet_name, _torch_module, read_flax_params

# The layers LoRA trainers target: attention projections and feed-forward layers (and proj_in/out).
_UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out_0", "proj_in", "proj_out", "proj", "net_2")
_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
_KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


@dataclasses.dataclass(frozen=True)
class WrittenLayer:
    component: str
    flax_kernel: tuple[str, ...]  # the Flax path of the kernel it changes
    down: np.ndarray  # PyTorch orientation: (rank, in) or (rank, in, kh, kw)
    up: np.ndarray  # (out, rank) or (out, rank, 1, 1)
    alpha: float


def random_layers(
    tiny_dir: Path,
    *,
    rank: int = 4,
    alpha: float = 2.0,
    seed: int = 0,
    components: Sequence[str] = ("unet", "text_encoder", "text_encoder_2"),
    convolutions: bool = False,
    every: int = 1,
) -> list[WrittenLayer]:
    """Random low-rank changes for the tiny model's usual LoRA targets (every `every`-th of them), plus
    its resnets' 3x3 convolutions (LoCon) with `convolutions`."""
    from flax.traverse_util import flatten_dict

    rng = np.random.default_rng(seed)
    layers = []
    for component in components:
        targets = _UNET_TARGETS if component == "unet" else _ENCODER_TARGETS
        flat = flatten_dict(read_flax_params(tiny_dir, component))
        kernels = sorted(path for path in flat if path[-1] == "kernel")
        chosen = [p for p in kernels if p[-2] in targets and np.asarray(flat[p]).ndim == 2][::every]
        if convolutions and component == "unet":
            chosen += [p for p in kernels if p[-2] in ("conv1", "conv2") and np.asarray(flat[p]).ndim == 4]
        for path in chosen:
            shape = np.asarray(flat[path]).shape
            if len(shape) == 2:  # Flax (in, out)
                inputs, outputs = shape
                down = rng.normal(0, 0.2, (rank, inputs))
                up = rng.normal(0, 0.2, (outputs, rank))
            else:  # Flax HWIO
                kh, kw, inputs, outputs = shape
                down = rng.normal(0, 0.1, (rank, inputs, kh, kw))
                up = rng.normal(0, 0.1, (outputs, rank, 1, 1))
            layers.append(
                WrittenLayer(component, path, down.astype(np.float32), up.astype(np.float32), alpha)
            )
    return layers


def torch_module_name(tiny_dir: Path, layer: WrittenLayer, *, original_unet_names: bool = False) -> str:
    """The PyTorch module path (dots) of the layer, in diffusers' or the original UNet layout."""
    modules = layer.flax_kernel[:-1]
    if layer.component != "unet":
        return ".".join(modules)  # transformers' Flax CLIP writes list indices as path elements already
    dotted = ".".join(_torch_module(m) for m in modules)
    if not original_unet_names:
        return dotted
    config = json.loads((Path(tiny_dir) / "unet" / "config.json").read_text())
    return _original_unet_name(dotted + ".weight", config).removesuffix(".weight")


def write_kohya(
    tiny_dir: Path,
    layers: Sequence[WrittenLayer],
    path: Path,
    *,
    original_unet_names: bool = False,
    dtype: Any = np.float16,
) -> Path:
    from safetensors.numpy import save_file

    state = {}
    for layer in layers:
        module = torch_module_name(tiny_dir, layer, original_unet_names=original_unet_names)
        name = _KOHYA_PREFIX[layer.component] + module.replace(".", "_")
        state[f"{name}.lora_down.weight"] = layer.down.astype(dtype)
        state[f"{name}.lora_up.weight"] = layer.up.astype(dtype)
        state[f"{name}.alpha"] = np.array(layer.alpha, dtype=dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"ss_network_module": "networks.lora"})
    return path


def write_diffusers(
    tiny_dir: Path,
    layers: Sequence[WrittenLayer],
    path: Path,
    *,
    spelling: str = "peft",
    with_alpha: bool = True,
    dtype: Any = np.float32,
) -> Path:
    """`spelling`: "peft" (lora_A/lora_B) or "lora.down" (lora.down/lora.up). Without alpha the reader
    must take alpha = rank: write layers whose alpha is their rank then."""
    from safetensors.numpy import save_file

    down_name, up_name = ("lora_A", "lora_B") if spelling == "peft" else ("lora.down", "lora.up")
    state = {}
    for layer in layers:
        name = f"{layer.component}.{torch_module_name(tiny_dir, layer)}"
        state[f"{name}.{down_name}.weight"] = layer.down.astype(dtype)
        state[f"{name}.{up_name}.weight"] = layer.up.astype(dtype)
        if with_alpha:
            state[f"{name}.alpha"] = np.array(layer.alpha, dtype=dtype)
        else:
            assert layer.alpha == layer.down.shape[0], "without alpha the format means alpha = rank"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return path


def flax_delta(layer: WrittenLayer, *, dtype: Any = np.float32) -> np.ndarray:
    """alpha / rank * up @ down, as the Flax kernel's change (the layer's weights as stored in `dtype`)."""
    down = layer.down.astype(dtype).astype(np.float64)
    up = layer.up.astype(dtype).astype(np.float64)
    rank = down.shape[0]
    alpha = float(np.asarray(layer.alpha, dtype=dtype))
    if down.ndim == 2:
        return (alpha / rank * (up @ down)).T  # (out, in) -> (in, out)
    outputs, inputs, kh, kw = up.shape[0], down.shape[1], down.shape[2], down.shape[3]
    torch_delta = (up.reshape(outputs, rank) @ down.reshape(rank, -1)).reshape(outputs, inputs, kh, kw)
    return alpha / rank * torch_delta.transpose(2, 3, 1, 0)  # OIHW -> HWIO


def merged_flax_params(
    params: dict[str, Any],
    stacked: Sequence[tuple[Sequence[WrittenLayer], float]],
    *,
    dtype: Any = np.float32,
) -> dict[str, Any]:
    """The pipeline's parameters with each (layers, scale) merged: W + scale * alpha/rank * up @ down."""
    import jax.numpy as jnp
    from flax.core.frozen_dict import unfreeze
    from flax.traverse_util import flatten_dict, unflatten_dict

    merged = dict(params)
    for component in ("unet", "text_encoder", "text_encoder_2"):
        changes = [
            (layer, scale) for layers, scale in stacked for layer in layers if layer.component == component
        ]
        if not changes:
            continue
        flat = flatten_dict(unfreeze(params[component]))
        for layer, scale in changes:
            kernel = np.asarray(flat[layer.flax_kernel], dtype=np.float64)
            flat[layer.flax_kernel] = kernel + scale * flax_delta(layer, dtype=dtype)
        merged[component] = unflatten_dict(
            {key: jnp.asarray(value, dtype=jnp.float32) for key, value in flat.items()}
        )
    return merged
