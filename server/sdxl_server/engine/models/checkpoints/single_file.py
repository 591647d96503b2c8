"""The original single-file SDXL layout (Stability's `sd_xl_base_1.0.safetensors`) as diffusers' layout.

One file holds four components under four prefixes:
- `model.diffusion_model.`: the UNet in the original (sgm) layout: `input_blocks.N.M`, `middle_block.M`,
  `output_blocks.N.M`, resnets with `in_layers`/`out_layers`/`emb_layers`;
- `first_stage_model.`: the VAE in the original (ldm) layout: `encoder.down.I.block.J`,
  `decoder.up.I` numbered from the lowest resolution up, mid attention as 1x1 convolutions;
- `conditioner.embedders.0.transformer.`: CLIP-L, already in the Hugging Face layout;
- `conditioner.embedders.1.model.`: OpenCLIP bigG: fused q/k/v `in_proj` weights, a `text_projection`
  matrix applied as x @ P (so the transpose of a linear weight).
`diffusers_weights` returns each component's tensors under their diffusers (PyTorch) names, renamed and
reshaped lazily, so that layout.py converts them like those of a diffusers folder. The UNet and VAE
block numbering depends on the architecture (levels, layers per level, which levels have attention), so
the map is computed from the component configs rather than written out for SDXL's sizes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from sdxl_server.engine.models.checkpoints.checkpoint_errors import CheckpointError
from sdxl_server.engine.models.checkpoints.tensor_files import Reader, Weights

PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "conditioner.embedders.0.transformer.",
    "text_encoder_2": "conditioner.embedders.1.model.",
}
# Tensors of the original training setup with no place in an inference pipeline.
_IGNORED = ("conditioner.embedders.1.model.logit_scale", "conditioner.embedders.1.model.attn_mask")

_UNET_TOP = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}
_UNET_RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_OPENCLIP_LAYER = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "attn.out_proj": "self_attn.out_proj",
}
_OPENCLIP_TOP = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}


def diffusers_weights(
    file: Weights, unet_config: dict[str, Any], vae_config: dict[str, Any]
) -> dict[str, Weights]:
    """Component -> its weights under diffusers names. Raises CheckpointError for a component that is
    absent or a tensor the layout has no name for."""
    grouped: dict[str, dict[str, Reader]] = {component: {} for component in PREFIXES}
    for name in file.names():
        component = next((c for c, prefix in PREFIXES.items() if name.startswith(prefix)), None)
        if component is None or name in _IGNORED:
            continue  # e.g. training-only tensors some files carry; nothing of the pipeline lives there
        grouped[component][name[len(PREFIXES[component]) :]] = file.readers[name]

    for component, readers in grouped.items():
        if not readers:
            raise CheckpointError(
                f"{file.where} has no {component} weights (no tensor named {PREFIXES[component]}*): "
                "it is not a single-file SDXL checkpoint"
            )
    where = file.where
    return {
        "unet": _renamed(grouped["unet"], _UnetNames(unet_config).diffusers_name, f"{where} (UNet)"),
        "vae": _vae(grouped["vae"], len(vae_config["block_out_channels"]), f"{where} (VAE)"),
        "text_encoder": Weights(f"{where} (CLIP-L)", grouped["text_encoder"]),
        "text_encoder_2": _openclip(grouped["text_encoder_2"], f"{where} (OpenCLIP bigG)"),
    }


def _renamed(readers: dict[str, Reader], rename: Callable[[str], str | None], where: str) -> Weights:
    out: dict[str, Reader] = {}
    for name, reader in readers.items():
        new = rename(name)
        if new is None:
            raise CheckpointError(f"{where}: tensor {name} has no counterpart in the diffusers layout")
        out[new] = reader
    return Weights(where, out)


def original_unet_name_to_diffusers(name: str, unet_config: dict[str, Any]) -> str | None:
    """The diffusers name of one original (sgm) UNet name (`input_blocks.4.1.proj_in.weight`), or None:
    LoRA files trained with kohya's SDXL scripts name their UNet layers this way."""
    return _UnetNames(unet_config).diffusers_name(name)


class _UnetNames:
    """Original UNet block indices -> diffusers block names, for one UNet config.

    Level i of the down path is input_blocks (L+1)*i + 1 .. (L+1)*i + L (a resnet at .0, attention at .1
    on levels that have it), then its downsampler at input_blocks (L+1)*(i+1) (.0.op); level i of the up
    path is output_blocks (L+1)*i .. (L+1)*i + L, its upsampler after the resnet and attention of the
    last one. L is layers_per_block; input_blocks.0 is conv_in.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        self.layers = int(config["layers_per_block"])
        self.up_attention = ["CrossAttn" in kind for kind in config["up_block_types"]]

    def diffusers_name(self, name: str) -> str | None:
        for original, new in _UNET_TOP.items():
            if name.startswith(original + "."):
                return new + name[len(original) :]
        parts = name.split(".")
        if len(parts) < 3 or not parts[1].isdigit():
            return None
        block, index, rest = parts[0], int(parts[1]), parts[2:]
        per_level = self.layers + 1
        if block == "middle_block":
            module = {0: "mid_block.resnets.0", 1: "mid_block.attentions.0", 2: "mid_block.resnets.1"}
            return _join(module.get(index), rest, resnet=index != 1)
        if not rest[0].isdigit():
            return None
        slot, rest = int(rest[0]), rest[1:]
        if block == "input_blocks" and index >= 1:
            level, layer = divmod(index - 1, per_level)
            if layer == self.layers:  # the downsampler: input_blocks.N.0.op
                if slot != 0 or rest[:1] != ["op"]:
                    return None
                return _join(f"down_blocks.{level}.downsamplers.0.conv", rest[1:], resnet=False)
            kind = {0: "resnets", 1: "attentions"}.get(slot)
            return _join(kind and f"down_blocks.{level}.{kind}.{layer}", rest, resnet=slot == 0)
        if block == "output_blocks":
            level, layer = divmod(index, per_level)
            has_attention = level < len(self.up_attention) and self.up_attention[level]
            if slot == 0:
                return _join(f"up_blocks.{level}.resnets.{layer}", rest, resnet=True)
            if slot == 1 and has_attention:
                return _join(f"up_blocks.{level}.attentions.{layer}", rest, resnet=False)
            if slot == (2 if has_attention else 1) and layer == self.layers:
                return _join(f"up_blocks.{level}.upsamplers.0", rest, resnet=False)
        return None


def _join(module: str | None, rest: list[str], *, resnet: bool) -> str | None:
    if module is None or not rest:
        return None
    tail = ".".join(rest)
    if resnet:
        for original, new in _UNET_RESNET.items():
            if tail.startswith(original + "."):
                tail = new + tail[len(original) :]
                break
    return f"{module}.{tail}"


def _vae(readers: dict[str, Reader], levels: int, where: str) -> Weights:
    def rename(name: str) -> str | None:
        parts = name.split(".")
        side = parts[0]
        if side in ("quant_conv", "post_quant_conv"):
            return name
        if side not in ("encoder", "decoder") or len(parts) < 3:
            return None
        if parts[1] in ("conv_in", "conv_out"):
            return name
        if parts[1] == "norm_out":
            return f"{side}.conv_norm_out.{'.'.join(parts[2:])}"
        if parts[1] == "mid":
            module = {"block_1": "mid_block.resnets.0", "block_2": "mid_block.resnets.1"}.get(parts[2])
            if module is not None:
                return f"{side}.{module}.{_vae_resnet('.'.join(parts[3:]))}"
            if parts[2] == "attn_1" and len(parts) == 5 and parts[3] in _VAE_ATTENTION:
                return f"{side}.mid_block.attentions.0.{_VAE_ATTENTION[parts[3]]}.{parts[4]}"
            return None
        if parts[1] in ("down", "up") and len(parts) >= 5 and parts[2].isdigit():
            # diffusers numbers the decoder's up blocks from the lowest resolution, the original from the top.
            level = int(parts[2]) if parts[1] == "down" else levels - 1 - int(parts[2])
            blocks = "down_blocks" if parts[1] == "down" else "up_blocks"
            if parts[3] == "block" and parts[4].isdigit():
                tail = _vae_resnet(".".join(parts[5:]))
                return f"{side}.{blocks}.{level}.resnets.{parts[4]}.{tail}"
            if parts[3] in ("downsample", "upsample"):
                sampler = "downsamplers" if parts[3] == "downsample" else "upsamplers"
                return f"{side}.{blocks}.{level}.{sampler}.0.{'.'.join(parts[4:])}"
        return None

    weights = _renamed(readers, rename, where)
    # The original mid attention projections are 1x1 convolutions; diffusers' are linear layers.
    for name, reader in list(weights.readers.items()):
        if ".mid_block.attentions.0.to_" in name and name.endswith(".weight"):
            weights.readers[name] = _squeezed(reader)
    return weights


def _vae_resnet(tail: str) -> str:
    return tail.replace("nin_shortcut", "conv_shortcut", 1)


def _squeezed(reader: Reader) -> Reader:
    def read() -> np.ndarray:
        tensor = reader()
        return tensor.reshape(tensor.shape[:2]) if tensor.ndim == 4 else tensor

    return read


def _openclip(readers: dict[str, Reader], where: str) -> Weights:
    out: dict[str, Reader] = {}
    for name, reader in readers.items():
        if name in _OPENCLIP_TOP:
            out[_OPENCLIP_TOP[name]] = reader
            continue
        if name == "text_projection":
            out["text_projection.weight"] = _transposed(reader)
            continue
        parts = name.split(".")
        if parts[:2] != ["transformer", "resblocks"] or len(parts) < 5 or not parts[2].isdigit():
            raise CheckpointError(
                f"{where}: tensor {name} has no counterpart in the Hugging Face CLIP layout"
            )
        layer = f"text_model.encoder.layers.{parts[2]}"
        tail = ".".join(parts[3:])
        if tail in ("attn.in_proj_weight", "attn.in_proj_bias"):
            leaf = "weight" if tail.endswith("weight") else "bias"
            for index, projection in enumerate(("q_proj", "k_proj", "v_proj")):
                out[f"{layer}.self_attn.{projection}.{leaf}"] = _third(reader, index)
            continue
        module, _, leaf = tail.rpartition(".")
        if module not in _OPENCLIP_LAYER:
            raise CheckpointError(
                f"{where}: tensor {name} has no counterpart in the Hugging Face CLIP layout"
            )
        out[f"{layer}.{_OPENCLIP_LAYER[module]}.{leaf}"] = reader
    return Weights(where, out)


def _transposed(reader: Reader) -> Reader:
    return lambda: reader().T


def _third(reader: Reader, index: int) -> Reader:
    """Rows index*D .. (index+1)*D of a fused (3D, ...) q/k/v tensor."""

    def read() -> np.ndarray:
        fused = reader()
        width = fused.shape[0] // 3
        return fused[index * width : (index + 1) * width]

    return read
