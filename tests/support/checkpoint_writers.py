"""Checkpoints in the layouts users have, written from the tiny Flax model with numpy only.

The inverse of what server/sdxl_server/engine/models/checkpoints/ reads, written independently of it (from the
layouts' definitions, not from its code), so that a naming or transposition mistake there does not
cancel out here:
- `write_pytorch_folder`: a diffusers folder as PyTorch pipelines save it (`*.safetensors`, OIHW
  convolutions, (out, in) linear weights, diffusers' dotted list indices, PyTorch class names);
- `write_single_file`: Stability's original single-file layout (as diffusers'
  scripts/convert_diffusers_to_original_sdxl.py writes it, plus OpenCLIP's fused q/k/v and transposed
  text projection, which that script leaves out).
In the test-support package so that unit and integration tests both import it. Also a command for people
who want such checkpoints: `python -m sdxl_test_support.checkpoint_writers TINY_DIR OUT_DIR`.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

FLAX_FILES = {
    "unet": "diffusion_flax_model.msgpack",
    "vae": "diffusion_flax_model.msgpack",
    "text_encoder": "flax_model.msgpack",
    "text_encoder_2": "flax_model.msgpack",
}
TORCH_FILES = {
    "unet": "diffusion_pytorch_model.safetensors",
    "vae": "diffusion_pytorch_model.safetensors",
    "text_encoder": "model.safetensors",
    "text_encoder_2": "model.safetensors",
}
TORCH_CLASSES = {
    "unet": "UNet2DConditionModel",
    "vae": "AutoencoderKL",
    "text_encoder": "CLIPTextModel",
    "text_encoder_2": "CLIPTextModelWithProjection",
    "scheduler": "EulerDiscreteScheduler",
}
# diffusers' module lists: PyTorch names their items `name.N`, the Flax modules `name_N`.
_DIFFUSERS_LISTS = (
    "down_blocks",
    "up_blocks",
    "resnets",
    "attentions",
    "transformer_blocks",
    "downsamplers",
    "upsamplers",
    "to_out",
    "net",
)
_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def read_flax_params(tiny_dir: Path, component: str) -> dict[str, Any]:
    from flax.serialization import msgpack_restore

    return msgpack_restore((Path(tiny_dir) / component / FLAX_FILES[component]).read_bytes())


def torch_state_dict(tiny_dir: Path, component: str) -> dict[str, np.ndarray]:
    """`component`'s weights under PyTorch names and in PyTorch's layout."""
    from flax.traverse_util import flatten_dict

    flat = flatten_dict(read_flax_params(tiny_dir, component))
    diffusers = component in ("unet", "vae")
    state = {}
    for path, value in flat.items():
        *modules, leaf = path
        if diffusers:
            modules = [_torch_module(m) for m in modules]
            if component == "vae" and modules[-1] in _VAE_ATTENTION:
                modules[-1] = _VAE_ATTENTION[modules[-1]]
        value = np.asarray(value)
        if leaf == "kernel":
            value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
        name = ".".join([*modules, "bias" if leaf == "bias" else "weight"])
        state[name] = np.ascontiguousarray(value)
    return state


def _torch_module(flax_name: str) -> str:
    match = re.fullmatch(r"(.+)_(\d+)", flax_name)
    if match and match.group(1) in _DIFFUSERS_LISTS:
        return f"{match.group(1)}.{match.group(2)}"
    return flax_name


def write_pytorch_folder(tiny_dir: Path, out: Path, *, dtype: Any = None, variant: str = "") -> Path:
    """The tiny model as a PyTorch-layout diffusers folder in `out`; weights cast to `dtype` if given, in
    files named like diffusers' variants (`variant=".fp16"`: `model.fp16.safetensors`)."""
    from safetensors.numpy import save_file

    tiny_dir, out = Path(tiny_dir), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for component, file_name in TORCH_FILES.items():
        (out / component).mkdir(exist_ok=True)
        state = torch_state_dict(tiny_dir, component)
        if dtype is not None:
            state = {name: value.astype(dtype) for name, value in state.items()}
        file_name = file_name.replace(".safetensors", f"{variant}.safetensors")
        save_file(state, str(out / component / file_name))
        config = json.loads((tiny_dir / component / "config.json").read_text())
        if component.startswith("text_encoder"):
            config["architectures"] = [TORCH_CLASSES[component]]
        else:
            config["_class_name"] = TORCH_CLASSES[component]
            config["act_fn"] = "silu"  # PyTorch-only keys the Flax modules must ignore
        (out / component / "config.json").write_text(json.dumps(config, indent=2))
    for tokenizer in ("tokenizer", "tokenizer_2"):
        shutil.copytree(tiny_dir / tokenizer, out / tokenizer, dirs_exist_ok=True)
    (out / "scheduler").mkdir(exist_ok=True)
    scheduler = json.loads((tiny_dir / "scheduler" / "scheduler_config.json").read_text())
    scheduler.update(_class_name=TORCH_CLASSES["scheduler"], steps_offset=1, use_karras_sigmas=False)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    index = json.loads((tiny_dir / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionXLPipeline"
    for component, class_name in TORCH_CLASSES.items():
        index[component] = [index[component][0], class_name]
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out


def write_single_file(tiny_dir: Path, path: Path) -> Path:
    """The tiny model as one original-layout SDXL safetensors file at `path`."""
    from safetensors.numpy import save_file

    tiny_dir = Path(tiny_dir)
    unet_config = json.loads((tiny_dir / "unet" / "config.json").read_text())
    vae_config = json.loads((tiny_dir / "vae" / "config.json").read_text())
    state: dict[str, np.ndarray] = {}
    for name, value in torch_state_dict(tiny_dir, "unet").items():
        state["model.diffusion_model." + _original_unet_name(name, unet_config)] = value
    for name, value in torch_state_dict(tiny_dir, "vae").items():
        original, value = _original_vae(name, value, len(vae_config["block_out_channels"]))
        state["first_stage_model." + original] = value
    for name, value in torch_state_dict(tiny_dir, "text_encoder").items():
        state["conditioner.embedders.0.transformer." + name] = value
    # A buffer older transformers saved with CLIP (sd_xl_base_1.0.safetensors has it): not a parameter.
    positions = state["conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight"]
    position_ids = np.arange(positions.shape[0], dtype=np.int64)[None]
    state["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = position_ids
    state.update(_openclip(torch_state_dict(tiny_dir, "text_encoder_2")))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return path


def _original_unet_name(name: str, config: dict[str, Any]) -> str:
    top = {
        "time_embedding.linear_1.": "time_embed.0.",
        "time_embedding.linear_2.": "time_embed.2.",
        "add_embedding.linear_1.": "label_emb.0.0.",
        "add_embedding.linear_2.": "label_emb.0.2.",
        "conv_in.": "input_blocks.0.0.",
        "conv_norm_out.": "out.0.",
        "conv_out.": "out.2.",
    }
    for new, original in top.items():
        if name.startswith(new):
            return original + name[len(new) :]
    per_level = config["layers_per_block"] + 1
    resnet = [
        ("norm1.", "in_layers.0."),
        ("conv1.", "in_layers.2."),
        ("time_emb_proj.", "emb_layers.1."),
        ("norm2.", "out_layers.0."),
        ("conv2.", "out_layers.3."),
        ("conv_shortcut.", "skip_connection."),
    ]

    def resnet_tail(tail: str) -> str:
        for new, original in resnet:
            if tail.startswith(new):
                return original + tail[len(new) :]
        raise AssertionError(tail)

    parts = name.split(".")
    if parts[0] == "mid_block":
        block = {("resnets", "0"): 0, ("attentions", "0"): 1, ("resnets", "1"): 2}[(parts[1], parts[2])]
        tail = ".".join(parts[3:])
        return f"middle_block.{block}." + (resnet_tail(tail) if parts[1] == "resnets" else tail)
    level, kind, index, tail = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
    if parts[0] == "down_blocks":
        if kind == "downsamplers":
            return f"input_blocks.{per_level * (level + 1)}.0.op.{tail.removeprefix('conv.')}"
        block = per_level * level + index + 1
        return (
            f"input_blocks.{block}.0.{resnet_tail(tail)}"
            if kind == "resnets"
            else f"input_blocks.{block}.1.{tail}"
        )
    has_attention = "CrossAttn" in config["up_block_types"][level]
    if kind == "upsamplers":
        return f"output_blocks.{per_level * level + per_level - 1}.{2 if has_attention else 1}.{tail}"
    block = per_level * level + index
    return (
        f"output_blocks.{block}.0.{resnet_tail(tail)}"
        if kind == "resnets"
        else f"output_blocks.{block}.1.{tail}"
    )


def _original_vae(name: str, value: np.ndarray, levels: int) -> tuple[str, np.ndarray]:
    parts = name.split(".")
    side, rest = parts[0], parts[1:]
    if side in ("quant_conv", "post_quant_conv"):
        return name, value
    if rest[0] == "conv_norm_out":
        return ".".join([side, "norm_out", *rest[1:]]), value
    if rest[0] in ("conv_in", "conv_out"):
        return name, value
    if rest[0] == "mid_block":
        if rest[1] == "resnets":
            tail = ".".join(rest[3:]).replace("conv_shortcut", "nin_shortcut")
            return f"{side}.mid.block_{int(rest[2]) + 1}.{tail}", value
        projection = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}[
            rest[3]
        ]
        leaf = rest[-1]
        if projection != "norm" and leaf == "weight":
            value = value.reshape(*value.shape, 1, 1)  # the original's 1x1 convolutions
        return f"{side}.mid.attn_1.{projection}.{leaf}", value
    level = int(rest[1])
    original_level = level if rest[0] == "down_blocks" else levels - 1 - level
    direction = "down" if rest[0] == "down_blocks" else "up"
    if rest[2] in ("downsamplers", "upsamplers"):
        sampler = "downsample" if rest[2] == "downsamplers" else "upsample"
        return f"{side}.{direction}.{original_level}.{sampler}.{'.'.join(rest[4:])}", value
    tail = ".".join(rest[4:]).replace("conv_shortcut", "nin_shortcut")
    return f"{side}.{direction}.{original_level}.block.{rest[3]}.{tail}", value


def _openclip(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    prefix = "conditioner.embedders.1.model."
    out = {
        prefix + "token_embedding.weight": state.pop("text_model.embeddings.token_embedding.weight"),
        prefix + "positional_embedding": state.pop("text_model.embeddings.position_embedding.weight"),
        prefix + "ln_final.weight": state.pop("text_model.final_layer_norm.weight"),
        prefix + "ln_final.bias": state.pop("text_model.final_layer_norm.bias"),
        # OpenCLIP computes pooled @ text_projection: the transpose of the Linear weight.
        prefix + "text_projection": np.ascontiguousarray(state.pop("text_projection.weight").T),
        prefix + "logit_scale": np.array(4.6052, np.float32),  # training-only: the loader must skip it
    }
    layers = sorted({int(n.split(".")[3]) for n in state if n.startswith("text_model.encoder.layers.")})
    renames = {
        "layer_norm1": "ln_1",
        "layer_norm2": "ln_2",
        "mlp.fc1": "mlp.c_fc",
        "mlp.fc2": "mlp.c_proj",
        "self_attn.out_proj": "attn.out_proj",
    }
    for layer in layers:
        ours = f"text_model.encoder.layers.{layer}."
        theirs = f"{prefix}transformer.resblocks.{layer}."
        for leaf in ("weight", "bias"):
            fused = [state.pop(f"{ours}self_attn.{p}_proj.{leaf}") for p in ("q", "k", "v")]
            out[f"{theirs}attn.in_proj_{leaf}"] = np.concatenate(fused)
            for new, original in renames.items():
                out[f"{theirs}{original}.{leaf}"] = state.pop(f"{ours}{new}.{leaf}")
    assert not state, f"OpenCLIP layout has no place for {sorted(state)}"
    return out


if __name__ == "__main__":
    source, target = Path(sys.argv[1]), Path(sys.argv[2])
    write_pytorch_folder(source, target / "pytorch-folder")
    write_single_file(source, target / "sdxl-single-file.safetensors")
    print(f"wrote {target / 'pytorch-folder'} and {target / 'sdxl-single-file.safetensors'}")
