"""Attention inside diffusers' Flax UNet and VAE, chosen per platform, without forking diffusers.

`xla` is diffusers' own code: it writes every score matrix (rows x heads x tokens x tokens) to memory and
reads it back. At SDXL's 64x64 level that is 640 MiB of temporaries per guided image on a v5e, and the
demo model, which attends at full latent resolution, needs 8 GiB per guided image at 1024x1024.

`flash` never materialises the score matrix:

* TPU: the Pallas TPU flash-attention kernel shipped with JAX (`tpu_flash_attention`);
* GPU: `jax.nn.dot_product_attention(implementation="cudnn")` (bf16/fp16, head dim <= 128; otherwise
  the blockwise fallback);
* CPU: `blockwise_attention`, an online softmax over key blocks, query blocks one at a time.

The kernel goes in while a program is traced: `attention_kernel(kind, platform)` is a context manager
that intercepts `FlaxAttention.__call__` (UNet) and `FlaxAttentionBlock.__call__` (VAE) with
`flax.linen.intercept_methods` and reproduces their projections, head split, scale and output projection
around the kernel, so the parameters and the module tree stay diffusers' own.

Every kernel here takes and returns the layout [batch, tokens, heads, head_dim] (diffusers'
`split_head_dim` layout, and `jax.nn.dot_product_attention`'s).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

ATTENTION_KINDS = ("xla", "flash")

# A kernel: (q, k, v [B, T, N, H], scale) -> [B, Tq, N, H].
Kernel = Callable[[jax.Array, jax.Array, jax.Array, float], jax.Array]

# Blockwise fallback: one score block is rows x heads x QUERY_BLOCK x KEY_BLOCK float32 (16 MiB for two
# rows of four heads), small enough for a CPU's caches to matter and large enough to keep dots efficient.
QUERY_BLOCK = 1024
KEY_BLOCK = 512
# The TPU kernel's tiles: 128 is the kernel's own default and the MXU's width.
TPU_BLOCK = 128
# Attentions with at most this many scores per row and head (one blockwise block) keep diffusers' code
# under `flash`: their score matrix is no larger than a kernel's working block, and a kernel only adds
# cost there (measured, bench/attention.py: the blockwise kernel 1.3-2x slower than XLA on this CPU at 256
# tokens; on v5e the 77-token cross attention padded to a 128-token tile costs 1.6x the FLOPs).
SMALLEST_SCORES = QUERY_BLOCK * KEY_BLOCK


def default_attention(platform: str) -> str:
    """The default per platform, from measurement (docs/PERFORMANCE.md, "Attention").

    TPU: `flash`; compiled for v5e, one SDXL 64x64-level attention drops from 640 MiB of temporaries and
    0.84 GB accessed to 0 MiB and 0.24 GB (issue 20). CPU: `flash`; the demo UNet at 512x512 on this
    machine's CPU: 71 MiB of temporaries instead of 604 MiB, and a step 2.05 s instead of 2.58 s; at
    768x768 XLA's program peaks at 8.2 GB of RAM. GPU: `xla`, because nothing here has measured
    cuDNN's kernel on one (`--attention flash` selects it).
    """
    return "xla" if platform in ("gpu", "cuda", "rocm") else "flash"


def resolve_attention(setting: str, platform: str) -> str:
    """The attention a setting means on `platform`: "auto" is the platform's default."""
    return default_attention(platform) if setting == "auto" else setting


def reference_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
    """diffusers' `split_head_dim` arithmetic: the score matrix in memory, softmax over keys."""
    scores = jnp.einsum("btnh,bfnh->bnft", k, q) * scale
    probs = nn.softmax(scores, axis=-1)
    return jnp.einsum("bnft,btnh->bfnh", probs, v)


def blockwise_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    scale: float,
    query_block: int = QUERY_BLOCK,
    key_block: int = KEY_BLOCK,
) -> jax.Array:
    """Exact attention that holds one score block at a time: queries in blocks (`lax.map`), and for each
    a scan over key blocks keeping the running maximum, normaliser and weighted sum (online softmax).
    Arithmetic in float32 whatever the input dtype; the result in the input's dtype."""
    batch, q_len, heads, head_dim = q.shape
    k_len = k.shape[1]
    if q_len <= query_block and k_len <= key_block:
        # One block holds everything: no scan, and the scores are no larger than one block of it.
        f32 = jnp.float32
        return reference_attention(q.astype(f32), k.astype(f32), v.astype(f32), scale).astype(q.dtype)
    key_block = min(key_block, k_len)
    query_block = min(query_block, q_len)
    k_blocks = -(-k_len // key_block)
    q_blocks = -(-q_len // query_block)
    k_pad = k_blocks * key_block - k_len
    q_pad = q_blocks * query_block - q_len
    f32 = jnp.float32
    # Keys padded to whole blocks are masked out; padded queries are computed and dropped.
    kp = jnp.pad(k.astype(f32), ((0, 0), (0, k_pad), (0, 0), (0, 0)))
    vp = jnp.pad(v.astype(f32), ((0, 0), (0, k_pad), (0, 0), (0, 0)))
    qp = jnp.pad(q.astype(f32) * scale, ((0, 0), (0, q_pad), (0, 0), (0, 0)))
    key_valid = (jnp.arange(k_blocks * key_block) < k_len).reshape(k_blocks, key_block)
    k_tiles = kp.reshape(batch, k_blocks, key_block, heads, head_dim).transpose(1, 0, 2, 3, 4)
    v_tiles = vp.reshape(batch, k_blocks, key_block, heads, head_dim).transpose(1, 0, 2, 3, 4)
    q_tiles = qp.reshape(batch, q_blocks, query_block, heads, head_dim).transpose(1, 0, 2, 3, 4)

    def one_query_block(q_tile: jax.Array) -> jax.Array:  # [B, Tq, N, H]
        def step(carry: Any, tile: Any) -> Any:
            running_max, normaliser, acc = carry
            k_tile, v_tile, valid = tile
            scores = jnp.einsum("bqnh,bknh->bnqk", q_tile, k_tile)
            scores = jnp.where(valid[None, None, None, :], scores, -jnp.inf)
            new_max = jnp.maximum(running_max, scores.max(axis=-1))
            correction = jnp.exp(running_max - new_max)
            weights = jnp.exp(scores - new_max[..., None])
            normaliser = normaliser * correction + weights.sum(axis=-1)
            acc = acc * correction[..., None] + jnp.einsum("bnqk,bknh->bnqh", weights, v_tile)
            return (new_max, normaliser, acc), None

        shape = (batch, heads, q_tile.shape[1])
        init = (jnp.full(shape, -jnp.inf, f32), jnp.zeros(shape, f32), jnp.zeros((*shape, head_dim), f32))
        (_, normaliser, acc), _ = jax.lax.scan(step, init, (k_tiles, v_tiles, key_valid))
        return (acc / normaliser[..., None]).transpose(0, 2, 1, 3)

    out = jax.lax.map(one_query_block, q_tiles)  # [q_blocks, B, Tq, N, H]
    out = out.transpose(1, 0, 2, 3, 4).reshape(batch, q_blocks * query_block, heads, head_dim)
    return out[:, :q_len].astype(q.dtype)


def tpu_flash_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, scale: float, interpret: bool = False
) -> jax.Array:
    """JAX's Pallas TPU flash-attention kernel (`jax.experimental.pallas.ops.tpu.flash_attention`).

    The kernel takes [B, N, T, H] in tiles of 128 tokens (its own default, the MXU's width). Token
    counts that are not a multiple of 128 (the 77 text tokens of cross attention, 4,032 tokens at
    1152x896) are padded to whole tiles: padded keys are masked out with the kernel's segment ids,
    padded queries are computed and dropped. `interpret=True` runs the same kernel in Pallas' TPU
    interpret mode (on CPU, for tests).
    """
    from jax.experimental.pallas import tpu as pltpu
    from jax.experimental.pallas.ops.tpu import flash_attention as pallas_flash

    batch, q_len, _, _ = q.shape
    k_len = k.shape[1]
    q_pad, k_pad = -q_len % TPU_BLOCK, -k_len % TPU_BLOCK
    segment_ids = None
    if k_pad:
        k, v = _pad_tokens(k, k_pad), _pad_tokens(v, k_pad)
        real_key = (jnp.arange(k_len + k_pad) < k_len).astype(jnp.int32)
        # A query (segment 1) attends only to keys of its own segment: the padding (segment 0) is masked.
        segment_ids = pallas_flash.SegmentIds(
            q=jnp.ones((batch, q_len + q_pad), jnp.int32),
            kv=jnp.broadcast_to(real_key, (batch, k_len + k_pad)),
        )
    block_sizes = pallas_flash.BlockSizes(
        block_q=TPU_BLOCK, block_k_major=TPU_BLOCK, block_k=TPU_BLOCK, block_b=1
    )
    to_heads_first = functools.partial(jnp.transpose, axes=(0, 2, 1, 3))
    context = pltpu.force_tpu_interpret_mode() if interpret else contextlib.nullcontext()
    with context:
        out = pallas_flash.flash_attention(
            to_heads_first(_pad_tokens(q, q_pad)),
            to_heads_first(k),
            to_heads_first(v),
            segment_ids=segment_ids,
            sm_scale=scale,
            block_sizes=block_sizes,
        )
    return to_heads_first(out)[:, :q_len]


def _pad_tokens(x: jax.Array, pad: int) -> jax.Array:
    return jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) if pad else x


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
    """cuDNN's fused attention where it applies (bf16/fp16, head dim at most 128); else blockwise."""
    if q.dtype not in (jnp.bfloat16, jnp.float16) or q.shape[-1] > 128:
        return blockwise_attention(q, k, v, scale)
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")


def flash_kernel(platform: str) -> Kernel:
    """The kernel `flash` means on `platform` (jax.default_backend() names)."""
    if platform == "tpu":
        return tpu_flash_attention
    if platform in ("gpu", "cuda", "rocm"):
        return cudnn_attention
    return blockwise_attention


@contextlib.contextmanager
def attention_kernel(
    kind: str, platform: str, kernel: Kernel | None = None, smallest_scores: int = SMALLEST_SCORES
) -> Iterator[None]:
    """While active, programs traced with diffusers' Flax UNet and VAE use `kind`'s attention.

    With `flash`, an attention whose score matrix has more than `smallest_scores` entries per row and
    head goes through the kernel; a smaller one keeps diffusers' own code. `kernel` overrides the
    platform's flash kernel (tests use the TPU kernel in interpret mode, and `smallest_scores=0` to put
    it under every attention).
    """
    if kind not in ATTENTION_KINDS:
        raise ValueError(f"attention: must be one of {', '.join(ATTENTION_KINDS)}, not {kind!r}")
    if kind == "xla":
        yield
        return
    chosen = kernel or flash_kernel(platform)
    with nn.intercept_methods(functools.partial(_intercept, chosen, smallest_scores)):
        yield


def _intercept(
    kernel: Kernel, smallest_scores: int, next_fun: Any, args: Any, kwargs: Any, context: Any
) -> Any:
    from diffusers.models.attention_flax import FlaxAttention
    from diffusers.models.vae_flax import FlaxAttentionBlock

    if context.method_name == "__call__":
        if isinstance(context.module, FlaxAttention):
            hidden_states = args[0]
            keys = args[1] if len(args) > 1 else kwargs.get("context")
            k_len = hidden_states.shape[1] if keys is None else keys.shape[1]
            if hidden_states.shape[1] * k_len > smallest_scores:
                return _unet_attention(context.module, kernel, *args, **kwargs)
        if isinstance(context.module, FlaxAttentionBlock):
            _, height, width, _ = args[0].shape
            if (height * width) ** 2 > smallest_scores:
                return _vae_attention(context.module, kernel, *args, **kwargs)
    return next_fun(*args, **kwargs)


def _unet_attention(
    module: Any, kernel: Kernel, hidden_states: jax.Array, context: Any = None, deterministic: bool = True
) -> jax.Array:
    """`FlaxAttention.__call__` with the kernel in place of its score matrix (both head layouts give the
    same numbers: `split_head_dim` only changes how diffusers arranges the heads)."""
    context = hidden_states if context is None else context
    batch = hidden_states.shape[0]
    split = (batch, -1, module.heads, module.dim_head)
    q = module.query(hidden_states).reshape(split)
    k = module.key(context).reshape(split)
    v = module.value(context).reshape(split)
    out = kernel(q, k, v, module.dim_head**-0.5).reshape(batch, -1, module.heads * module.dim_head)
    return module.dropout_layer(module.proj_attn(out), deterministic=deterministic)


def _vae_attention(module: Any, kernel: Kernel, hidden_states: jax.Array) -> jax.Array:
    """`FlaxAttentionBlock.__call__`: diffusers scales q and k by d^-1/4 each, the kernel q.k by d^-1/2."""
    residual = hidden_states
    batch, height, width, channels = hidden_states.shape
    flat = module.group_norm(hidden_states).reshape((batch, height * width, channels))
    heads = module.num_heads
    split = (batch, height * width, heads, channels // heads)
    q = module.query(flat).reshape(split)
    k = module.key(flat).reshape(split)
    v = module.value(flat).reshape(split)
    out = kernel(q, k, v, 1 / math.sqrt(channels / heads)).reshape(batch, height * width, channels)
    return module.proj_attn(out).reshape((batch, height, width, channels)) + residual


def attention_flops(batch: int, heads: int, q_len: int, k_len: int, head_dim: int) -> int:
    """FLOPs of one attention, counted analytically: QK^T and PV (2 x multiply-add each).

    For the AOT table where a kernel is opaque to XLA's cost analysis. The Pallas TPU kernel passes a
    `CostEstimate` with the same count to `pallas_call`, so XLA's analysis includes it on TPU; a custom
    call (cuDNN) is not counted by XLA, and there this function's figure must be added.
    """
    return 4 * batch * heads * q_len * k_len * head_dim


def score_matrix_bytes(batch: int, heads: int, q_len: int, k_len: int, itemsize: int = 4) -> int:
    """Bytes of one score matrix, what `xla` writes to memory (at least once: scores, then probs)."""
    return batch * heads * q_len * k_len * itemsize
