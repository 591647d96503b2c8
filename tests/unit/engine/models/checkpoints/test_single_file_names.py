"""The single-file key map at SDXL 1.0 base's own sizes (3 levels, 2 and 10 transformer blocks deep).

The tiny model covers the layout end to end but has 2 levels; these are tensor names as they appear in
Stability's sd_xl_base_1.0.safetensors, where block numbers run higher and the up path's upsamplers sit
after an attention block.
"""

from __future__ import annotations

import numpy as np
import pytest
from sdxl_server.engine.models.architectures import sdxl_base
from sdxl_server.engine.models.checkpoints.single_file import PREFIXES, diffusers_weights
from sdxl_server.engine.models.checkpoints.tensor_files import Weights

# Component -> {name without the component's prefix in the file: its diffusers name}.
ORIGINAL_TO_DIFFUSERS = {
    "unet": {
        "input_blocks.0.0.weight": "conv_in.weight",
        "label_emb.0.2.bias": "add_embedding.linear_2.bias",
        "input_blocks.2.0.emb_layers.1.weight": "down_blocks.0.resnets.1.time_emb_proj.weight",
        "input_blocks.3.0.op.weight": "down_blocks.0.downsamplers.0.conv.weight",
        "input_blocks.4.0.skip_connection.weight": "down_blocks.1.resnets.0.conv_shortcut.weight",
        "input_blocks.6.0.op.bias": "down_blocks.1.downsamplers.0.conv.bias",
        "input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight": (
            "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k.weight"
        ),
        "middle_block.1.transformer_blocks.9.ff.net.0.proj.weight": (
            "mid_block.attentions.0.transformer_blocks.9.ff.net.0.proj.weight"
        ),
        "middle_block.2.out_layers.3.weight": "mid_block.resnets.1.conv2.weight",
        "output_blocks.2.1.proj_out.weight": "up_blocks.0.attentions.2.proj_out.weight",
        "output_blocks.2.2.conv.weight": "up_blocks.0.upsamplers.0.conv.weight",
        "output_blocks.5.2.conv.bias": "up_blocks.1.upsamplers.0.conv.bias",
        "output_blocks.8.0.in_layers.0.weight": "up_blocks.2.resnets.2.norm1.weight",
        "out.2.weight": "conv_out.weight",
    },
    "vae": {
        "encoder.down.3.block.1.conv2.weight": "encoder.down_blocks.3.resnets.1.conv2.weight",
        "encoder.down.2.downsample.conv.weight": "encoder.down_blocks.2.downsamplers.0.conv.weight",
        "encoder.mid.attn_1.proj_out.weight": "encoder.mid_block.attentions.0.to_out.0.weight",
        "decoder.mid.block_2.norm1.bias": "decoder.mid_block.resnets.1.norm1.bias",
        "decoder.up.0.block.0.nin_shortcut.weight": "decoder.up_blocks.3.resnets.0.conv_shortcut.weight",
        "decoder.up.3.upsample.conv.weight": "decoder.up_blocks.0.upsamplers.0.conv.weight",
        "decoder.norm_out.weight": "decoder.conv_norm_out.weight",
        "post_quant_conv.bias": "post_quant_conv.bias",
    },
    "text_encoder": {
        "text_model.encoder.layers.11.mlp.fc2.weight": ("text_model.encoder.layers.11.mlp.fc2.weight"),
    },
    "text_encoder_2": {
        "positional_embedding": "text_model.embeddings.position_embedding.weight",
        "transformer.resblocks.31.ln_2.bias": ("text_model.encoder.layers.31.layer_norm2.bias"),
        "transformer.resblocks.0.mlp.c_proj.weight": ("text_model.encoder.layers.0.mlp.fc2.weight"),
    },
}


@pytest.fixture(scope="module")
def converted():
    names = [PREFIXES[c] + name for c, component in ORIGINAL_TO_DIFFUSERS.items() for name in component]
    fused = PREFIXES["text_encoder_2"] + "transformer.resblocks.31.attn.in_proj_weight"
    projection = PREFIXES["text_encoder_2"] + "text_projection"
    arrays = {name: np.zeros((1,), np.float16) for name in names}
    arrays[fused] = np.arange(6 * 2, dtype=np.float16).reshape(6, 2)  # q, k, v rows of a width-2 model
    arrays[projection] = np.arange(6, dtype=np.float16).reshape(2, 3)  # applied as x @ P: (width, projection)
    file = Weights("sd_xl_base_1.0.safetensors", {name: (lambda a=a: a) for name, a in arrays.items()})
    return diffusers_weights(file, sdxl_base.UNET, sdxl_base.VAE)


@pytest.mark.parametrize("component", list(ORIGINAL_TO_DIFFUSERS))
def test_sdxl_base_tensor_names_map_to_diffusers_names(converted, component):
    weights = converted[component]
    expected = set(ORIGINAL_TO_DIFFUSERS[component].values())
    assert expected <= set(weights.names())


def test_openclip_fused_attention_splits_and_its_projection_transposes(converted):
    weights = converted["text_encoder_2"]
    layer = "text_model.encoder.layers.31.self_attn"
    rows = [weights.read(f"{layer}.{p}_proj.weight").tolist() for p in ("q", "k", "v")]
    assert rows == [[[0, 1], [2, 3]], [[4, 5], [6, 7]], [[8, 9], [10, 11]]]
    # A Linear weight is (out, in): the transpose of the (width, projection) matrix.
    assert weights.read("text_projection.weight").tolist() == [[0, 3], [1, 4], [2, 5]]
