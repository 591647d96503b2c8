"""Inside `parameters_as_loaded`, Flax modules read their parameters without tracing their initializers
again, compute what they compute under Flax's own check, and Flax's method is back once the last use
ends."""

from __future__ import annotations

import threading

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core.scope import Scope
from flax.errors import ScopeParamNotFoundError
from sdxl_server.engine.device.flax_parameters import parameters_as_loaded

FLAX_PARAM = Scope.param


class CountedInit:
    """An initializer that counts how often Flax calls it (its shape check traces it at every read)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, key, shape, dtype=jnp.float32):
        self.calls += 1
        return jax.random.normal(key, shape, dtype)


class Layer(nn.Module):
    initializer: CountedInit

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", self.initializer, (x.shape[-1], 3))
        return jnp.tanh(x @ kernel)


def test_parameters_are_read_without_the_initializer_and_give_the_same_result() -> None:
    counted = CountedInit()
    layer, x = Layer(counted), jnp.linspace(-1.0, 1.0, 8).reshape(2, 4)
    params = layer.init(jax.random.key(0), x)
    counted.calls = 0
    checked = jax.jit(layer.apply)(params, x)
    assert counted.calls == 1  # Flax's own check traced the initializer
    with parameters_as_loaded():
        unchecked = jax.jit(lambda p, v: layer.apply(p, v))(params, x)
    assert counted.calls == 1  # not again
    np.testing.assert_array_equal(np.asarray(unchecked), np.asarray(checked))
    jax.jit(lambda p, v: layer.apply(p, v) + 0.0)(params, x)
    assert counted.calls == 2 and Scope.param is FLAX_PARAM  # Flax's check is back after the block


def test_a_missing_parameter_still_fails_as_flax_fails() -> None:
    layer, x = Layer(CountedInit()), jnp.ones((2, 4))
    with parameters_as_loaded(), pytest.raises(ScopeParamNotFoundError):
        layer.apply({"params": {"other": jnp.ones((4, 3))}}, x)


def test_flax_s_method_comes_back_only_when_the_last_use_ends() -> None:
    inner_open, outer_may_end = threading.Event(), threading.Event()
    seen_inside = []

    def other_thread() -> None:
        with parameters_as_loaded():
            inner_open.set()
            assert outer_may_end.wait(60)
        seen_inside.append(Scope.param is FLAX_PARAM)

    worker = threading.Thread(target=other_thread)
    with parameters_as_loaded():
        worker.start()
        assert inner_open.wait(60)
    still_switched = Scope.param is not FLAX_PARAM  # this block ended, the other thread's has not
    outer_may_end.set()
    worker.join(60)
    assert still_switched and seen_inside == [True] and Scope.param is FLAX_PARAM
