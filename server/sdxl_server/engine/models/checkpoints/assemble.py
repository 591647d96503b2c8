"""A FlaxStableDiffusionXLPipeline and its parameters from configs and PyTorch-layout weights.

What `FlaxStableDiffusionXLPipeline.from_pretrained` returns for a Flax folder, built here instead: the
same module classes made from the same configs with the same settings (UNet and VAE in the parameter
dtype; the text encoders as transformers loads them, in float32), the same Euler scheduler and its
state, so that the engine cannot tell the difference and its compiled programs are the same.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np

from sdxl_server.engine.models.checkpoints.component_configs import ModelConfigs
from sdxl_server.engine.models.checkpoints.layout import (
    DIFFUSERS,
    TRANSFORMERS,
    FlaxPath,
    expected_shapes,
    to_flax,
)
from sdxl_server.engine.models.checkpoints.tensor_files import Weights

log = logging.getLogger(__name__)

# Parameter shapes by (naming, config JSON): see _expected_shapes.
_SHAPES: dict[tuple[str, str], dict[FlaxPath, Any]] = {}
# The engine's sampler is Euler's; a checkpoint's scheduler config contributes its noise schedule.
_EULER = ("EulerDiscreteScheduler", "FlaxEulerDiscreteScheduler")


def build_pipeline(
    configs: ModelConfigs, weights: dict[str, Weights], *, dtype: Any, split_head_dim: bool
) -> tuple[Any, dict[str, Any]]:
    """(pipeline, params) as from_pretrained gives them: params holds every component and "scheduler"."""
    from diffusers import FlaxEulerDiscreteScheduler, FlaxStableDiffusionXLPipeline

    numpy_dtype = np.dtype(dtype)
    tokenizer, tokenizer_2 = configs.load_tokenizers()  # first: it may fail, and costs nothing
    unet, vae, text_encoder, text_encoder_2 = build_modules(
        configs, dtype=dtype, split_head_dim=split_head_dim
    )

    params: dict[str, Any] = {}
    for component, module, naming in (
        ("unet", unet, DIFFUSERS),
        ("vae", vae, DIFFUSERS),
        ("text_encoder", text_encoder, TRANSFORMERS),
        ("text_encoder_2", text_encoder_2, TRANSFORMERS),
    ):
        params[component] = to_flax(
            weights[component],
            _expected_shapes(module, naming, configs.configs[component]),
            naming=naming,
            component=component,
            dtype=numpy_dtype,
        )

    scheduler_config = _public(configs.configs["scheduler"])
    kind = configs.configs["scheduler"].get("_class_name")
    if kind not in (None, *_EULER):
        log.info(
            "the checkpoint's scheduler is %s; the engine samples with Euler on its noise schedule", kind
        )
    scheduler: Any = FlaxEulerDiscreteScheduler.from_config(scheduler_config)
    params["scheduler"] = scheduler.create_state()

    pipeline = FlaxStableDiffusionXLPipeline(
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        vae=vae,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        dtype=dtype,
    )
    return pipeline, params


def build_modules(configs: ModelConfigs, *, dtype: Any, split_head_dim: bool) -> tuple[Any, Any, Any, Any]:
    """The UNet, VAE and both text encoders as modules (no weights), from the configs, with the settings
    the engine serves them with; `sdxl-server compile` builds abstract programs from these alone."""
    from diffusers import FlaxAutoencoderKL, FlaxUNet2DConditionModel

    unet: Any = FlaxUNet2DConditionModel.from_config(
        _public(configs.configs["unet"]), dtype=dtype, split_head_dim=split_head_dim
    )
    vae: Any = FlaxAutoencoderKL.from_config(_public(configs.configs["vae"]), dtype=dtype)
    text_encoder = _text_encoder(configs.configs["text_encoder"], with_projection=False)
    text_encoder_2 = _text_encoder(configs.configs["text_encoder_2"], with_projection=True)
    return unet, vae, text_encoder, text_encoder_2


def _expected_shapes(module: Any, naming: str, config: dict[str, Any]) -> dict[FlaxPath, Any]:
    """Every parameter's path and shape, from tracing the module's initialiser without computing anything
    (seconds for SDXL's UNet). Kept per config: a process that loads several checkpoints of one
    architecture (the tests) traces it once."""
    key = (naming, json.dumps(config, sort_keys=True))  # shapes depend on neither dtype nor head split
    if key not in _SHAPES:
        import jax

        rng = jax.random.PRNGKey(0)
        if naming == DIFFUSERS:
            shapes = jax.eval_shape(module.init_weights, rng)
        else:
            positions = int(module.config.max_position_embeddings)
            shapes = jax.eval_shape(lambda k: module.init_weights(k, (1, positions)), rng)
        _SHAPES[key] = expected_shapes(shapes)
    return _SHAPES[key]


def _public(config: dict[str, Any]) -> dict[str, Any]:
    """Without the bookkeeping keys (`_class_name`, `_diffusers_version`, ...) a config file carries."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _text_encoder(config: dict[str, Any], *, with_projection: bool) -> Any:
    from transformers import CLIPTextConfig, FlaxCLIPTextModel, FlaxCLIPTextModelWithProjection

    text_config = CLIPTextConfig.from_dict(_public(config))
    model_class = FlaxCLIPTextModelWithProjection if with_projection else FlaxCLIPTextModel
    return model_class(text_config, _do_init=False)
