"""Tracing the model's Flax modules without Flax re-checking each parameter's shape at every read.

In `apply`, Flax linen's `Scope.param` checks an existing parameter's shape against the module's
initializer by tracing that initializer (`jax.eval_shape` of a random init) every time the parameter is
read: thousands of small traces per UNet program, and the engine traces the same modules with the same
parameters for every program it compiles. Their shapes were checked once, when the model was made:
diffusers' `from_pretrained` compares each loaded array with the module's own shape, and random or
abstract weights come from the modules' init. Measured on this 2-core CPU: tracing and lowering SDXL 1.0
base's UNet at 1024x1024 (abstract bf16 weights) took 4.0-4.2 s against 6.5-7.2 s with the check, per
program that holds a UNet; a tiny-model engine's start (2 slots, one resolution, empty cache) 38.6-38.7 s
against 44.0-45.5 s, alternating with the code before in one session.

Inside `parameters_as_loaded()` an existing parameter is returned as Flax returns it (reserved, unboxed),
without the check; a missing one still goes through Flax, which raises as it always does in `apply`.
The switch is process-wide (Flax reads the method from the class), so it is counted: nested and
concurrent uses put Flax's own method back only when the last one ends. A module traced by another
thread meanwhile skips the check too, which changes nothing it computes.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

from flax.core import meta
from flax.core.scope import Scope

_FLAX_PARAM = Scope.param
_lock = threading.Lock()
_users = 0  # the contexts open now, under _lock


def _param_as_loaded(
    scope: Scope,
    name: str,
    init_fn: Callable[..., Any],
    *init_args: Any,
    unbox: bool = True,
    **init_kwargs: Any,
) -> Any:
    if not scope.has_variable("params", name):
        return _FLAX_PARAM(scope, name, init_fn, *init_args, unbox=unbox, **init_kwargs)
    scope.reserve(name, "params")
    value = scope.get_variable("params", name)
    return meta.unbox(value) if unbox else value


@contextlib.contextmanager
def parameters_as_loaded() -> Iterator[None]:
    """Flax modules applied in this block read their parameters without the shape check (see above)."""
    global _users
    with _lock:
        _users += 1
        Scope.param = _param_as_loaded  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        with _lock:
            _users -= 1
            if _users == 0:
                Scope.param = _FLAX_PARAM  # type: ignore[method-assign]
