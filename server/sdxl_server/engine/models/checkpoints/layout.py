"""PyTorch-layout weights (diffusers / transformers state-dict names) into a Flax parameter tree.

The conversion is guided by the tree the Flax module expects (its parameter shapes, traced without
computing anything): each PyTorch name maps to the Flax path whose leaf exists there, so a norm's
`weight` becomes `scale`, an embedding's `embedding` and anything else a `kernel`. The layouts differ in
four ways:
- names: diffusers' Flax modules write a list index into the name (`down_blocks.0` is `down_blocks_0`),
  transformers' keep it as a path element (`layers/0`);
- diffusers' Flax VAE calls its attention projections query/key/value/proj_attn where PyTorch says
  to_q/to_k/to_v/to_out.0 (UNet attention keeps the PyTorch names);
- a convolution kernel is OIHW in PyTorch and HWIO in Flax;
- a linear weight is (out, in) in PyTorch and a Flax kernel (in, out).
Every expected parameter must be filled and every tensor must land somewhere with its expected shape:
anything else means the checkpoint belongs to another architecture than the config, and the error says
which tensor.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sdxl_server.engine.models.checkpoints.checkpoint_errors import CheckpointError
from sdxl_server.engine.models.checkpoints.tensor_files import Weights

FlaxPath = tuple[str, ...]

DIFFUSERS = "diffusers"
TRANSFORMERS = "transformers"

# diffusers' Flax VAE attention (FlaxAttentionBlock) names for the PyTorch Attention projections.
_VAE_ATTENTION_NAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out_0": "proj_attn"}
# Buffers PyTorch saves with some checkpoints that are not parameters.
_IGNORED_SUFFIXES = ("position_ids",)
_MESSAGE_EXAMPLES = 5


def expected_shapes(init_params: Any) -> dict[FlaxPath, Any]:
    """Flat {path: ShapeDtypeStruct} of a parameter tree from `jax.eval_shape(module.init_weights, ...)`."""
    from flax.core.frozen_dict import unfreeze
    from flax.traverse_util import flatten_dict

    return dict(flatten_dict(unfreeze(init_params)))


def to_flax(
    weights: Weights, expected: dict[FlaxPath, Any], *, naming: str, component: str, dtype: Any
) -> dict[str, Any]:
    """The nested Flax parameters of `component`, each a numpy array of `dtype`.

    `naming` is DIFFUSERS or TRANSFORMERS (how the Flax module spells list indices). Raises
    CheckpointError naming the tensor for an unknown name or a wrong shape, and listing the
    parameters the checkpoint lacks.
    """
    from flax.traverse_util import unflatten_dict

    leaves_at: dict[FlaxPath, set[str]] = {}
    for path in expected:
        leaves_at.setdefault(path[:-1], set()).add(path[-1])

    converted: dict[FlaxPath, np.ndarray] = {}
    unknown: list[str] = []
    for name in weights.names():
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        found = _flax_path(name, naming, leaves_at)
        if found is None:
            unknown.append(name)
            continue
        path = found
        if path in converted:  # e.g. both to_q and query in one VAE: which one is meant is unknowable
            raise CheckpointError(f"{component}: {weights.where} has two tensors for {'/'.join(path)}")
        want = expected[path]
        tensor = _reshape(weights.read(name), path[-1])
        if tuple(tensor.shape) != tuple(want.shape):
            raise CheckpointError(
                f"{component}: {weights.where} tensor {name} has shape {tuple(tensor.shape)} as "
                f"{'/'.join(path)}, but the config makes it {tuple(want.shape)}: the checkpoint and its "
                "config describe different architectures"
            )
        converted[path] = np.ascontiguousarray(tensor).astype(dtype, copy=False)

    if unknown:
        raise CheckpointError(
            f"{component}: {weights.where} holds {len(unknown)} tensors its config has no place for "
            f"(e.g. {_examples(unknown)}): the checkpoint and its config describe different architectures"
        )
    missing = ["/".join(path) for path in expected if path not in converted]
    if missing:
        raise CheckpointError(
            f"{component}: {weights.where} lacks {len(missing)} of the {len(expected)} parameters its config "
            f"needs (Flax names, e.g. {_examples(missing)})"
        )
    return unflatten_dict(converted)


def _flax_path(name: str, naming: str, leaves_at: dict[FlaxPath, set[str]]) -> FlaxPath | None:
    """Where the PyTorch tensor `name` goes in the Flax tree, or None if nowhere."""
    parts = name.split(".")
    prefix, leaf = _module_path(parts[:-1], naming), parts[-1]
    if naming == DIFFUSERS and prefix and prefix[-1] in _VAE_ATTENTION_NAMES:
        renamed = (*prefix[:-1], _VAE_ATTENTION_NAMES[prefix[-1]])
        if renamed in leaves_at:
            prefix = renamed
    leaves = leaves_at.get(prefix, set())
    if leaf in ("bias", "beta"):
        candidates: tuple[str, ...] = ("bias",)
    elif leaf in ("weight", "gamma"):
        candidates = ("scale", "embedding", "kernel")
    else:
        return None
    for candidate in candidates:
        if candidate in leaves:
            return (*prefix, candidate)
    return None


def _module_path(parts: list[str], naming: str) -> FlaxPath:
    if naming == TRANSFORMERS:
        return tuple(parts)
    joined: list[str] = []
    for part in parts:
        if part.isdigit() and joined:
            joined[-1] = f"{joined[-1]}_{part}"
        else:
            joined.append(part)
    return tuple(joined)


def _reshape(tensor: np.ndarray, flax_leaf: str) -> np.ndarray:
    if flax_leaf != "kernel":
        return tensor
    if tensor.ndim == 4:  # convolution: OIHW -> HWIO
        return tensor.transpose(2, 3, 1, 0)
    if tensor.ndim == 2:  # linear: (out, in) -> (in, out)
        return tensor.T
    return tensor


def _examples(names: list[str]) -> str:
    shown = ", ".join(names[:_MESSAGE_EXAMPLES])
    return shown + (", ..." if len(names) > _MESSAGE_EXAMPLES else "")
