"""Weights read from safetensors files as numpy arrays, one tensor at a time (no PyTorch).

A `Weights` is a set of named tensors whose values are read only when asked for, so that converting a
multi-gigabyte checkpoint holds roughly one copy of it in memory, not two. The single-file key map
builds renamed and reshaped views over the same reads.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy: safetensors.numpy needs it for BF16 files)
import numpy as np

from sdxl_server.engine.models.checkpoints.checkpoint_errors import CheckpointError

Reader = Callable[[], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Weights:
    """Named tensors of one component. `where` says where they come from, for error messages."""

    where: str
    readers: dict[str, Reader]

    def names(self) -> list[str]:
        return sorted(self.readers)

    def read(self, name: str) -> np.ndarray:
        return self.readers[name]()


def open_safetensors(paths: list[Path], where: str) -> Weights:
    """The tensors of one or more safetensors files (the shards of one component)."""
    from safetensors import safe_open

    readers: dict[str, Reader] = {}
    for path in paths:
        try:
            handle = safe_open(str(path), framework="numpy")
        except Exception as error:  # the library's errors are not one type
            raise CheckpointError(f"{path} is not a readable safetensors file: {error}") from None
        for name in handle.keys():  # noqa: SIM118  (safe_open handles are not iterable)
            readers[name] = _reader(handle, name, path)
    return Weights(where=where, readers=readers)


def shard_paths(index_file: Path) -> list[Path]:
    """The files a `*.safetensors.index.json` (a sharded checkpoint's table of contents) names."""
    try:
        weight_map = json.loads(index_file.read_text())["weight_map"]
    except (OSError, ValueError, KeyError) as error:
        raise CheckpointError(f"{index_file} is not a safetensors index: {error}") from None
    return [index_file.parent / name for name in sorted(set(weight_map.values()))]


def _reader(handle: object, name: str, path: Path) -> Reader:
    def read() -> np.ndarray:
        try:
            return handle.get_tensor(name)  # type: ignore[attr-defined]
        except Exception as error:
            raise CheckpointError(f"{path}: cannot read tensor {name}: {error}") from None

    return read
