"""Loading a diffusers-format Flax SDXL pipeline and tokenizing prompts the way it does."""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sdxl_server.engine.quiet import silence_library_noise

# Parameter groups the programs use; the scheduler state is kept apart (float32, host side).
PARAM_GROUPS = ("text_encoder", "text_encoder_2", "unet", "vae")


def resolve_dtype(name: str, platform: str) -> Any:
    """'auto' is bfloat16 on accelerators and float32 on the CPU (where bf16 is slow and imprecise)."""
    if name == "auto":
        return jnp.float32 if platform == "cpu" else jnp.bfloat16
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


@dataclasses.dataclass
class LoadedModel:
    pipeline: Any  # FlaxStableDiffusionXLPipeline: module definitions, tokenizers, scheduler
    params: dict[str, Any]  # PARAM_GROUPS, cast to `dtype`
    scheduler_state: Any  # float32 always: bf16 schedules give black or degraded images
    dtype: Any
    max_tokens: int
    vae_scale_factor: int
    latent_channels: int
    _tokenizer_lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    @property
    def dtype_name(self) -> str:
        return jnp.dtype(self.dtype).name

    def tokenize(self, text: str) -> tuple[np.ndarray, bool]:
        """Token ids int32[2, max_tokens] (one row per text encoder) and whether `text` was truncated.

        Same padding and truncation as `FlaxStableDiffusionXLPipeline.prepare_inputs`.
        """
        rows = []
        truncated = False
        with self._tokenizer_lock:  # the Python CLIP tokenizer keeps a cache that is not thread-safe
            for tokenizer in (self.pipeline.tokenizer, self.pipeline.tokenizer_2):
                full = tokenizer(text, truncation=False, verbose=False)["input_ids"]
                truncated = truncated or len(full) > self.max_tokens
                ids = tokenizer(
                    text,
                    padding="max_length",
                    max_length=self.max_tokens,
                    truncation=True,
                    return_tensors="np",
                ).input_ids
                rows.append(ids[0])
        return np.stack(rows).astype(np.int32), truncated


def load_model(source: str, dtype_name: str, model_configs: str | None = None) -> LoadedModel:
    """Loads the pipeline from a diffusers folder (Flax or PyTorch-layout safetensors weights), a
    single-file SDXL checkpoint (read with `model_configs`: a configs folder or an architecture name,
    default sdxl-base) or a hub id; parameters cast to the resolved dtype."""
    silence_library_noise()
    from sdxl_server.engine.checkpoints import load_pipeline

    platform = jax.default_backend()
    dtype = resolve_dtype(dtype_name, platform)
    pipeline, params = load_pipeline(
        source,
        model_configs,
        dtype=dtype,
        # Splitting the head dimension makes attention much faster on TPU (the reference recipe's setting).
        split_head_dim=platform == "tpu",
    )
    scheduler_state = params.pop("scheduler")
    # diffusers' to_bf16 calls the removed jax.tree_map; the scheduler state stays float32 regardless.
    cast = {
        group: jax.tree_util.tree_map(lambda x: jnp.asarray(x, dtype=dtype), params[group])
        for group in PARAM_GROUPS
    }
    return LoadedModel(
        pipeline=pipeline,
        params=cast,
        scheduler_state=scheduler_state,
        dtype=dtype,
        max_tokens=int(pipeline.tokenizer.model_max_length),
        vae_scale_factor=int(pipeline.vae_scale_factor),
        latent_channels=int(pipeline.unet.config.in_channels),
    )
