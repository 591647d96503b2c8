"""The seed's recipe, as the Hugging Face blog post on SDXL with JAX on Cloud TPU v5e writes it.

`FlaxStableDiffusionXLPipeline.from_pretrained`, the scheduler state kept float32 while the parameters
take the serving dtype, params replicated over the devices, the prompt ids replicated, one PRNG key per
device (`jax.random.split`), `pipeline(..., jit=True)` (pmap over the devices: one fused program for the
text encoders, every denoising step and the VAE), then `numpy_to_pil`. Nothing of ours is used, so it
is the outside baseline our engine is compared with (same model, devices, batch, size and steps).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax.jax_utils import replicate


class SeedRecipe:
    def __init__(self, model_dir: str, devices: int, dtype: str = "float32") -> None:
        from diffusers import FlaxStableDiffusionXLPipeline

        pipeline, params = FlaxStableDiffusionXLPipeline.from_pretrained(model_dir)
        scheduler_state = params.pop("scheduler")
        params = jax.tree_util.tree_map(lambda x: x.astype(jnp.dtype(dtype)), params)
        params["scheduler"] = scheduler_state
        self.devices = jax.local_devices()[:devices]
        self.pipeline = pipeline
        self.p_params = replicate(params, devices=self.devices)

    def generate(
        self,
        prompts: list[str],
        negative_prompt: str,
        seed: int,
        steps: int,
        guidance_scale: float,
        height: int,
        width: int,
    ) -> list:
        """len(prompts) images per device (the batch per device), as PIL images, len(devices) x as many."""
        prompt_ids = self.pipeline.prepare_inputs(prompts)
        neg_prompt_ids = self.pipeline.prepare_inputs([negative_prompt] * len(prompts))
        p_prompt_ids = replicate(prompt_ids, devices=self.devices)
        p_neg_prompt_ids = replicate(neg_prompt_ids, devices=self.devices)
        rng = jax.random.split(jax.random.PRNGKey(seed), len(self.devices))
        images = self.pipeline(
            p_prompt_ids,
            self.p_params,
            rng,
            num_inference_steps=steps,
            neg_prompt_ids=p_neg_prompt_ids,
            guidance_scale=guidance_scale,
            height=height,
            width=width,
            jit=True,
        ).images
        images = images.reshape((images.shape[0] * images.shape[1], *images.shape[-3:]))
        return self.pipeline.numpy_to_pil(np.array(images))
