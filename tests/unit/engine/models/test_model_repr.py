"""A pod's start jits shard_maps over functools.partial(fn, model, ...); JAX formats such a partial (its
arguments included) for debug info, so the model's repr must not format its parameters."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec
from sdxl_server.engine.models.loader import LoadedModel


class _CountedArray:
    """A parameter leaf that counts how often it is formatted."""

    formatted = 0

    def __repr__(self) -> str:
        _CountedArray.formatted += 1
        return "array(...)"


def _model() -> LoadedModel:
    return LoadedModel(
        pipeline=object(),
        params={"unet": {"kernel": _CountedArray()}},
        scheduler_state={"sigmas": _CountedArray()},
        dtype=jnp.float32,
        max_tokens=77,
        vae_scale_factor=8,
        latent_channels=4,
    )


def _scaled(model: LoadedModel, x: jax.Array) -> jax.Array:
    return x * model.vae_scale_factor


def test_jitting_a_shard_map_over_the_model_never_formats_its_parameters() -> None:
    model = _model()
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    program = jax.shard_map(
        functools.partial(_scaled, model), mesh=mesh, in_specs=PartitionSpec(), out_specs=PartitionSpec()
    )
    before = _CountedArray.formatted
    result = jax.jit(program)(jnp.ones(2))
    assert _CountedArray.formatted == before
    assert result.tolist() == [8.0, 8.0]


def test_the_repr_names_the_model_settings_only() -> None:
    expected = "LoadedModel(dtype=float32, max_tokens=77, vae_scale_factor=8, latent_channels=4)"
    assert repr(_model()) == expected
