"""Where a LoRA file's layer names land in the Flax SDXL parameter tree.

Adapters name the linear or convolution layer they change, in one of three spellings:
- diffusers / PEFT: the PyTorch module path with dots (`down_blocks.1.attentions.0.transformer_blocks.0.
  attn1.to_q`, `text_model.encoder.layers.0.self_attn.q_proj`);
- kohya / A1111 with diffusers' UNet names: the same path with underscores for dots
  (`down_blocks_1_attentions_0_..._attn1_to_q`);
- kohya's SDXL scripts: the original (sgm) UNet names with underscores (`input_blocks_4_1_transformer_
  blocks_0_attn1_to_q`), mapped through the single-file checkpoint's key map (models/checkpoints).
Both dot and underscore spellings of a diffusers path become the Flax module path joined with
underscores (diffusers' Flax modules write list indices as `name_N`, transformers' as a path element),
so one table per component, built from the model's own kernels, answers both; an ambiguous join (two
modules spelled alike) is left out of the table rather than guessed.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

from sdxl_server.engine.models.checkpoints.single_file import original_unet_name_to_diffusers

FlaxPath = tuple[str, ...]
# The components an adapter may change; the VAE is never a LoRA target.
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


class LayerNames:
    """The model's LoRA-targetable layers: each component's kernels by path, with their shapes."""

    def __init__(self, kernel_shapes: Mapping[str, Mapping[FlaxPath, tuple[int, ...]]], unet_config: Any):
        """`kernel_shapes`: per component, every `kernel` parameter's path and shape; `unet_config`: the
        UNet's config (layers per block and block types decide the original names)."""
        self.kernel_shapes = {component: dict(kernel_shapes.get(component, {})) for component in COMPONENTS}
        self._unet_config = {
            "layers_per_block": unet_config["layers_per_block"],
            "up_block_types": list(unet_config["up_block_types"]),
        }
        self._by_joined: dict[str, dict[str, FlaxPath]] = {}
        for component, shapes in self.kernel_shapes.items():
            table: dict[str, FlaxPath] = {}
            ambiguous: set[str] = set()
            for path in shapes:
                joined = "_".join(path[:-1])
                if joined in table:
                    ambiguous.add(joined)
                table[joined] = path
            for joined in ambiguous:
                del table[joined]
            self._by_joined[component] = table

    def kernel(self, component: str, module: str) -> FlaxPath | None:
        """The kernel path of the layer `module` names (any spelling above), or None."""
        joined = module.replace(".", "_")
        found = self._by_joined[component].get(joined)
        if found is not None or component != "unet":
            return found
        diffusers = original_unet_name_to_diffusers(_dotted_indices(joined) + ".weight", self._unet_config)
        if diffusers is None:
            return None
        return self._by_joined["unet"].get(diffusers.removesuffix(".weight").replace(".", "_"))

    def shape(self, component: str, path: FlaxPath) -> tuple[int, ...]:
        return self.kernel_shapes[component][path]


def layer_names_of(params: Mapping[str, Any], unet_config: Any) -> LayerNames:
    """The table for a loaded model: `params` holds the components' parameter trees."""
    from flax.core.frozen_dict import unfreeze
    from flax.traverse_util import flatten_dict

    shapes: dict[str, dict[FlaxPath, tuple[int, ...]]] = {}
    for component in COMPONENTS:
        flat = flatten_dict(unfreeze(params[component]))
        shapes[component] = {
            tuple(path): tuple(int(d) for d in value.shape)
            for path, value in flat.items()
            if path[-1] == "kernel"
        }
    return LayerNames(shapes, unet_config)


def _dotted_indices(joined: str) -> str:
    """List indices as the original layout writes them: `input_blocks_4_1_proj_in` is
    `input_blocks.4.1.proj_in` (the original map reads the rest of a name with its own underscores)."""
    words = joined.split("_")
    out = words[0]
    for before, word in itertools.pairwise(words):
        out += ("." if word.isdigit() or before.isdigit() else "_") + word
    return out
