"""Merging adapters into the base weights at start (`--fuse-lora`): distillation LoRAs (Lightning,
Hyper-SD, LCM, DMD2) then cost nothing per step, since the compiled programs never see them.

Each changed kernel is merged in float32 and cast back to the parameter dtype once, so that a bf16
model takes no more rounding than its own weights have.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sdxl_server.engine.adapters.fuse_spec import FusedLora
from sdxl_server.engine.adapters.layer_names import LayerNames, layer_names_of
from sdxl_server.engine.adapters.lora_file import AdapterError, LoraLayer, read_lora_file

log = logging.getLogger(__name__)


class FuseError(ValueError):
    """A --fuse-lora adapter cannot be merged; the message names the file and why."""


def fuse_into_model(model: Any, fused: Sequence[FusedLora]) -> None:
    """Merges `fused` into a LoadedModel's parameters (the UNet's and text encoders'), in place."""
    if fused:
        names = layer_names_of(model.params, model.pipeline.unet.config)
        model.params = fuse_loras(model.params, names, fused)


def fuse_loras(params: dict[str, Any], names: LayerNames, fused: Sequence[FusedLora]) -> dict[str, Any]:
    """`params` (the components' trees) with every adapter of `fused` merged in, in order."""
    for item in fused:
        path = Path(item.path).expanduser()
        try:
            layers = read_lora_file(path, names).load()
        except AdapterError as error:
            raise FuseError(f"--fuse-lora {path}: {error}") from None
        params = merge_layers(params, layers, item.scale)
        log.info(
            "fused LoRA %s at scale %g: %d layers of %s",
            path.name,
            item.scale,
            len(layers),
            ", ".join(sorted({layer.component for layer in layers})),
        )
    return params


def merge_layers(params: dict[str, Any], layers: Sequence[LoraLayer], scale: float) -> dict[str, Any]:
    """W + scale * alpha/rank * up @ down for each layer, in the kernels' own dtype and placement."""
    import jax.numpy as jnp
    from flax.core.frozen_dict import FrozenDict, freeze, unfreeze
    from flax.traverse_util import flatten_dict, unflatten_dict

    by_component: dict[str, list[LoraLayer]] = {}
    for layer in layers:
        by_component.setdefault(layer.component, []).append(layer)
    merged = dict(params)
    for component, changes in by_component.items():
        flat = flatten_dict(unfreeze(params[component]))
        for layer in changes:
            kernel = flat[layer.kernel]
            delta = np.float32(scale) * layer.delta()
            flat[layer.kernel] = jnp.asarray(np.asarray(kernel, dtype=np.float32) + delta, dtype=kernel.dtype)
        tree = unflatten_dict(flat)
        # The same container type as before: the programs' argument structure must not change.
        merged[component] = freeze(tree) if isinstance(params[component], FrozenDict) else tree
    return merged
