"""Attention kernels against diffusers' arithmetic, and their interception inside diffusers' modules."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sdxl_server.engine.device.attention import (
    SMALLEST_SCORES,
    attention_flops,
    attention_kernel,
    blockwise_attention,
    reference_attention,
    tpu_flash_attention,
)


def qkv(batch, q_len, k_len, heads, head_dim, dtype=jnp.float32, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(keys[0], (batch, q_len, heads, head_dim), dtype)
    k = jax.random.normal(keys[1], (batch, k_len, heads, head_dim), dtype)
    v = jax.random.normal(keys[2], (batch, k_len, heads, head_dim), dtype)
    return q, k, v


# (batch, q tokens, k tokens, heads, head dim): the demo UNet's self attention at 64x64 pixels (level 0
# and level 1), its cross attention (77 text tokens), and token counts that do not fill whole blocks.
SHAPES = [
    (2, 64, 64, 4, 16),
    (2, 16, 16, 6, 16),
    (2, 64, 77, 4, 16),
    (1, 300, 300, 2, 8),
    (3, 130, 77, 1, 32),
]


@pytest.mark.parametrize("shape", SHAPES)
def test_blockwise_equals_the_score_matrix_in_float32(shape):
    q, k, v = qkv(*shape)
    scale = shape[-1] ** -0.5
    # Small blocks so that every case runs several query and key blocks, padded ones included.
    out = blockwise_attention(q, k, v, scale, query_block=48, key_block=32)
    assert out.shape == q.shape
    np.testing.assert_allclose(out, reference_attention(q, k, v, scale), atol=2e-6, rtol=1e-5)


def test_blockwise_keeps_the_dtype_and_is_as_close_as_bf16_allows():
    q, k, v = qkv(2, 200, 200, 2, 16, jnp.bfloat16)
    out = blockwise_attention(q, k, v, 0.25, query_block=64, key_block=64)
    assert out.dtype == jnp.bfloat16
    exact = reference_attention(*(x.astype(jnp.float32) for x in (q, k, v)), 0.25)
    np.testing.assert_allclose(out.astype(jnp.float32), exact, atol=2e-2)


@pytest.mark.slow
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2], (1, 200, 300, 2, 64)])
def test_pallas_tpu_kernel_in_interpret_mode_equals_the_score_matrix(shape):
    """JAX's Pallas TPU flash-attention kernel, run by Pallas' TPU interpreter on this CPU, with the
    padding and masking this module adds (tokens not a multiple of 128, 77 text tokens)."""
    q, k, v = qkv(*shape)
    scale = shape[-1] ** -0.5
    out = tpu_flash_attention(q, k, v, scale, interpret=True)
    assert out.shape == q.shape
    np.testing.assert_allclose(out, reference_attention(q, k, v, scale), atol=2e-6, rtol=1e-5)


def test_analytic_flops_match_xla_s_count_of_the_score_matrix_path():
    batch, q_len, k_len, heads, head_dim = 2, 256, 77, 4, 16
    args = [jax.ShapeDtypeStruct((batch, n, heads, head_dim), jnp.float32) for n in (q_len, k_len, k_len)]
    cost = jax.jit(functools.partial(reference_attention, scale=0.25)).lower(*args).compile().cost_analysis()
    counted = attention_flops(batch, heads, q_len, k_len, head_dim)
    # XLA adds the scale and the softmax (a few FLOPs per score) to the two matmuls.
    assert counted <= cost["flops"] <= counted * 1.15


def test_an_unknown_kind_is_refused_naming_the_setting():
    with pytest.raises(ValueError, match="attention"), attention_kernel("fast", "cpu"):
        pass


@pytest.fixture(scope="module")
def demo_model():
    from sdxl_server.engine.models.loader import load_model
    from sdxl_server.engine.models.model_source import resolve_model

    return load_model(resolve_model("demo", None), "float32")


def unet_noise(model, kind, kernel=None, latent_size=16, smallest_scores=0):
    """The demo UNet on two rows (a guided image), traced under `kind`'s attention (by default with the
    kernel under every attention, however small)."""
    keys = jax.random.split(jax.random.PRNGKey(3), 3)
    sample = jax.random.normal(keys[0], (2, 4, latent_size, latent_size))
    embeds = jax.random.normal(keys[1], (2, 77, 64))
    pooled = jax.random.normal(keys[2], (2, 32))
    time_ids = jnp.broadcast_to(jnp.array([128.0, 128, 0, 0, 128, 128]), (2, 6))
    unet = model.pipeline.unet

    def apply(params, sample):
        with attention_kernel(kind, "cpu", kernel, smallest_scores):
            return unet.apply(
                {"params": params},
                sample,
                jnp.array([500, 500]),
                encoder_hidden_states=embeds,
                added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
            ).sample

    return jax.jit(apply)(model.params["unet"], sample)


def traced_calls(model, smallest_scores, latent_size):
    """(q, k) shapes of each kernel call while the demo UNet and VAE are traced (eval_shape: no compile)."""
    calls = []

    def counting(q, k, v, scale):
        calls.append((q.shape, k.shape))
        return reference_attention(q, k, v, scale)

    unet, vae = model.pipeline.unet, model.pipeline.vae
    with attention_kernel("flash", "cpu", counting, smallest_scores):
        jax.eval_shape(
            lambda p, x: unet.apply({"params": p}, x, jnp.array([1, 1]), jnp.ones((2, 77, 64)),
                                    {"text_embeds": jnp.ones((2, 32)), "time_ids": jnp.ones((2, 6))}),
            model.params["unet"],
            jax.ShapeDtypeStruct((2, 4, latent_size, latent_size), jnp.float32),
        )  # fmt: skip
        unet_calls = list(calls)
        jax.eval_shape(
            lambda p, x: vae.apply({"params": p}, x, method=vae.decode),
            model.params["vae"],
            jax.ShapeDtypeStruct((1, 4, latent_size, latent_size), jnp.float32),
        )
    return unet_calls, calls[len(unet_calls) :]


def test_flash_can_reach_every_attention_of_the_unet_and_the_vae(demo_model):
    """Each transformer block's self and cross attention, and the VAE's mid-block attention."""
    unet_calls, vae_calls = traced_calls(demo_model, smallest_scores=0, latent_size=8)
    attentions = sum(1 for _ in _modules(demo_model.params["unet"], "attn1"))
    assert len(unet_calls) == 2 * attentions
    assert sum(1 for _, k in unet_calls if k[1] == 77) == attentions  # cross attention over the text
    assert len(vae_calls) == 1


def test_flash_keeps_diffusers_code_for_attentions_no_larger_than_one_block(demo_model):
    """At 32x32 latents the demo's first level attends over 1,024 tokens (1,024^2 scores: the kernel);
    its second level over 256 and its cross attention over 1,024 x 77 (one block each: diffusers')."""
    unet_calls, vae_calls = traced_calls(demo_model, SMALLEST_SCORES, latent_size=32)
    assert unet_calls and all(q[1] == k[1] == 1024 for q, k in unet_calls)
    assert [(q[1], k[1]) for q, k in vae_calls] == [(1024, 1024)]


def _modules(tree, name):
    for key, value in tree.items():
        if key == name:
            yield value
        elif isinstance(value, dict):
            yield from _modules(value, name)


def unet_temp_bytes(model, kind, latent_size):
    """Temporaries of the compiled demo UNet on a guided image, from XLA's memory analysis."""
    unet = model.pipeline.unet
    params = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), model.params["unet"])

    def apply(params, sample, embeds, pooled, time_ids):
        with attention_kernel(kind, "cpu"):
            added = {"text_embeds": pooled, "time_ids": time_ids}
            return unet.apply({"params": params}, sample, jnp.array([500, 500]), embeds, added).sample

    shapes = [(2, 4, latent_size, latent_size), (2, 77, 64), (2, 32), (2, 6)]
    args = [jax.ShapeDtypeStruct(shape, jnp.float32) for shape in shapes]
    return jax.jit(apply).lower(params, *args).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.slow
def test_flash_holds_no_score_matrix_where_xla_does(demo_model):
    """At 512x512 the demo UNet attends over 4,096 tokens: 2 rows x 4 heads x 4,096^2 float32 scores are
    512 MiB, which XLA's program holds and the blockwise one never does."""
    score_matrix = 2 * 4 * 4096 * 4096 * 4
    assert unet_temp_bytes(demo_model, "xla", 64) >= score_matrix
    assert unet_temp_bytes(demo_model, "flash", 64) < score_matrix / 4


@pytest.mark.slow
def test_blockwise_unet_noise_equals_xla_s(demo_model):
    xla = unet_noise(demo_model, "xla")
    flash = unet_noise(demo_model, "flash")
    np.testing.assert_allclose(flash, xla, atol=2e-5)


@pytest.mark.slow
def test_pallas_tpu_kernel_inside_the_unet_equals_xla_s(demo_model):
    kernel = functools.partial(tpu_flash_attention, interpret=True)
    np.testing.assert_allclose(
        unet_noise(demo_model, "flash", kernel, 8), unet_noise(demo_model, "xla", None, 8), atol=2e-5
    )
