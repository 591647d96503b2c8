"""Per-row LoRA deltas inside diffusers' and transformers' Flax modules, without forking them.

While `row_adapters(bank, places, scales)` is active, every `flax.linen.Dense` call whose module path the
bank covers returns, for each row b of its batch,

    x_b @ W + sum_s scales[b, s] * (x_b @ down[places[b, s]]) @ up[places[b, s]]

so rows of one UNet batch can use different adapters (or none: a zero scale, or a place left empty),
stacked up to S per row. The bank's arrays are arguments of the compiled program, so writing a new
adapter into a place never recompiles. The interception is the same mechanism as device/attention.py's
(`flax.linen.intercept_methods`), and it composes with it: the attention kernel's own calls to its
projections pass through here too.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# A covered Dense module's path -> (down [places, in, rank], up [places, rank, out]).
Bank = Mapping[tuple[str, ...], tuple[jax.Array, jax.Array]]


@contextlib.contextmanager
def row_adapters(bank: Bank, places: jax.Array, scales: jax.Array) -> Iterator[None]:
    """`places` int32[rows, S] and `scales` float32[rows, S]: row b applies the adapter in place
    places[b, s] at scale scales[b, s], for each s."""
    with nn.intercept_methods(functools.partial(_intercept, bank, places, scales)):
        yield


def _intercept(
    bank: Bank, places: jax.Array, scales: jax.Array, next_fun: Any, args: Any, kwargs: Any, context: Any
) -> Any:
    out = next_fun(*args, **kwargs)
    if context.method_name != "__call__" or not isinstance(context.module, nn.Dense):
        return out
    factors = bank.get(tuple(context.module.path))
    if factors is None:
        return out
    down, up = factors
    x = args[0] if args else kwargs["inputs"]
    rows, stacked = places.shape
    low = jnp.einsum("b...i,bsir->b...sr", x, down[places].astype(x.dtype))
    low = low * scales.reshape((rows,) + (1,) * (x.ndim - 2) + (stacked, 1)).astype(x.dtype)
    delta = jnp.einsum("b...sr,bsro->b...o", low, up[places].astype(x.dtype))
    return out + delta.astype(out.dtype)
