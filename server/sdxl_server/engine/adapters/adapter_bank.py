"""The adapter bank's layout: a fixed number of places, each able to hold one adapter's low-rank factors
for every layer the bank covers, with the rank padded to a maximum. Loading an adapter writes one place
of arrays whose shapes never change, so nothing recompiles (row_deltas.py applies them per UNet row).

Covered: the UNet's linear layers inside its transformers (attention projections, feed-forward,
proj_in/proj_out: what LoRA trainers target) and the text encoders' linear layers. A LoCon convolution,
a layer outside those or a rank above the maximum makes an adapter unusable per request, with the
reason; such an adapter can still be merged at start (`--fuse-lora`). A place's up factor carries the
adapter's alpha / rank, so the device multiplies by the request's scale only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from sdxl_server.engine.adapters.layer_names import FlaxPath, LayerNames
from sdxl_server.engine.adapters.lora_file import LoraFile, LoraLayer

# The components a per-request adapter may change, each with its own bank.
ADAPTER_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
ModulePath = tuple[str, ...]  # a kernel's path without its final "kernel": what a Dense module is called


def covered_kernels(names: LayerNames, component: str) -> tuple[FlaxPath, ...]:
    """The kernels a bank for `component` covers, in a fixed order."""
    shapes = names.kernel_shapes[component]
    if component == "unet":
        inside = [p for p in shapes if any(part.startswith("attentions_") for part in p)]
    else:
        inside = [p for p in shapes if "layers" in p]
    return tuple(sorted(p for p in inside if len(shapes[p]) == 2))


@dataclasses.dataclass(frozen=True)
class BankLayout:
    """What one component's bank holds: per covered layer, down [places, in, max_rank] and up [places,
    max_rank, out]."""

    component: str
    kernels: tuple[FlaxPath, ...]
    shapes: tuple[tuple[int, int], ...]  # (in, out) per kernel
    places: int
    max_rank: int

    @classmethod
    def of(cls, names: LayerNames, component: str, places: int, max_rank: int) -> BankLayout:
        kernels = covered_kernels(names, component)
        shapes = tuple(tuple(names.shape(component, k)) for k in kernels)
        return cls(component, kernels, shapes, places, max_rank)  # type: ignore[arg-type]

    def bytes_per_place(self, itemsize: int) -> int:
        return sum((i + o) * self.max_rank * itemsize for i, o in self.shapes)

    def problem(self, lora: LoraFile) -> str | None:
        """Why `lora`'s layers of this component cannot go into the bank, or None."""
        covered = set(self.kernels)
        for layer in lora.layers:
            if layer.component != self.component:
                continue
            if layer.convolution:
                return (
                    f"layer {layer.module} is a convolution (LoCon): per-request adapters cover linear "
                    "layers only; merge it at start with --fuse-lora"
                )
            if layer.kernel not in covered:
                return f"layer {layer.module} is outside the layers per-request adapters cover"
            if layer.rank > self.max_rank:
                return f"rank {layer.rank} is above the adapter bank's maximum {self.max_rank}"
        return None

    def array_shapes(self) -> dict[ModulePath, tuple[tuple[int, int, int], tuple[int, int, int]]]:
        """Per covered module, the shapes of its down [places, in, max_rank] and up [places, max_rank,
        out] arrays (what `sdxl-server compile` compiles from, allocating nothing)."""
        return {
            kernel[:-1]: ((self.places, i, self.max_rank), (self.places, self.max_rank, o))
            for kernel, (i, o) in zip(self.kernels, self.shapes, strict=True)
        }

    def empty(self, dtype: np.dtype | type = np.float32) -> dict[ModulePath, tuple[np.ndarray, np.ndarray]]:
        """Every place zero: a row pointing at it (with any scale) changes nothing."""
        return {
            module: (np.zeros(down, dtype), np.zeros(up, dtype))
            for module, (down, up) in self.array_shapes().items()
        }

    def place(
        self, layers: Sequence[LoraLayer], dtype: np.dtype | type = np.float32
    ) -> dict[ModulePath, tuple[np.ndarray, np.ndarray]]:
        """One place's contents for an adapter: its factors padded to max_rank (zeros beyond its rank and
        for the layers it does not change), the up factor times alpha / rank."""
        by_kernel = {layer.kernel: layer for layer in layers if layer.component == self.component}
        contents = {}
        for kernel, (i, o) in zip(self.kernels, self.shapes, strict=True):
            down = np.zeros((i, self.max_rank), np.float32)
            up = np.zeros((self.max_rank, o), np.float32)
            layer = by_kernel.get(kernel)
            if layer is not None:
                down[:, : layer.rank] = layer.down
                up[: layer.rank] = layer.up * np.float32(layer.alpha / layer.rank)
            contents[kernel[:-1]] = (down.astype(dtype), up.astype(dtype))
        return contents
