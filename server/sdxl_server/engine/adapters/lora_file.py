"""One LoRA `.safetensors` file, read with numpy (no PyTorch), in the two formats people publish.

- kohya / A1111: `lora_unet_<module>`, `lora_te1_<module>` (CLIP-L), `lora_te2_<module>` (OpenCLIP bigG,
  in the Hugging Face CLIP names), each with `.lora_down.weight`, `.lora_up.weight` and a scalar `.alpha`;
- diffusers / PEFT: `unet.<module>`, `text_encoder.<module>`, `text_encoder_2.<module>`, each with
  `.lora_A.weight` / `.lora_B.weight` or `.lora.down.weight` / `.lora.up.weight` (and diffusers'
  older attention-processor spelling `<attention>.processor.to_q_lora.down.weight`); an `.alpha` is
  optional (PEFT keeps it in a JSON file beside the weights; without it alpha is the rank).
A layer's change is `alpha / rank * up @ down` (PyTorch orientation). Linear layers and convolutions
(LoCon: a down convolution of the layer's kernel size, a 1x1 up convolution) are read. `read_lora_file`
reads only the file's header and the alphas, so a directory of large adapters is checked in
milliseconds; `LoraFile.load` reads the weights. Anything the file holds that is not such a layer, or a
layer with no place or the wrong shape in the model, is an AdapterError naming it: the adapter is
unusable, never partly applied.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy: safetensors.numpy needs it for BF16 files)
import numpy as np

from sdxl_server.engine.adapters.layer_names import FlaxPath, LayerNames

_KOHYA_COMPONENTS = {"lora_unet_": "unet", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}
_KOHYA_COMPONENTS_SD1 = {"lora_te_": "text_encoder"}  # one-encoder files name CLIP-L this way
_DIFFUSERS_COMPONENTS = ("text_encoder_2.", "text_encoder.", "unet.")  # longest prefix first
_DOWN = ("lora_down.weight", "lora_A.weight", "lora.down.weight")
_UP = ("lora_up.weight", "lora_B.weight", "lora.up.weight")
_ALPHA = ("alpha",)
# Kinds of adapter that are not plain LoRA (LyCORIS' LoHa and LoKr, DoRA): named in the refusal.
_OTHER_KINDS = ("hada_", "lokr_", "lora_mid", "dora_scale", "lora_magnitude_vector")
_PROCESSOR = re.compile(r"^(.*)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_MESSAGE_EXAMPLES = 3


class AdapterError(ValueError):
    """Why a LoRA file cannot be used (malformed, another kind of adapter, layers the model lacks)."""


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """One layer of a file as its header describes it."""

    component: str
    kernel: FlaxPath  # where the change goes in the component's parameters
    module: str  # the layer as the file names it, for messages
    down_key: str
    up_key: str
    alpha: float
    rank: int
    convolution: bool


@dataclasses.dataclass(frozen=True)
class LoraLayer:
    """One layer's low-rank change in the Flax kernel's orientation: kernel += alpha/rank * down . up."""

    component: str
    kernel: FlaxPath
    down: np.ndarray  # float32: (in, rank) for a linear layer, (kh, kw, in, rank) for a convolution
    up: np.ndarray  # float32: (rank, out)
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[-1])

    def delta(self) -> np.ndarray:
        """The change to the Flax kernel at scale 1, float32, in the kernel's shape."""
        return np.tensordot(self.down, self.up, axes=1) * np.float32(self.alpha / self.rank)


@dataclasses.dataclass(frozen=True)
class LoraFile:
    path: Path
    layers: tuple[LayerSpec, ...]

    @property
    def rank(self) -> int:
        return max(layer.rank for layer in self.layers)

    @property
    def components(self) -> tuple[str, ...]:
        return tuple(sorted({layer.component for layer in self.layers}))

    def load(self) -> tuple[LoraLayer, ...]:
        """Every layer's weights, as float32 in the Flax orientation. Raises AdapterError."""
        handle = _open(self.path)
        layers = []
        for spec in self.layers:
            down = _tensor(handle, spec.down_key).astype(np.float32)
            up = _tensor(handle, spec.up_key).astype(np.float32)
            # convolution: (rank, in, kh, kw) -> (kh, kw, in, rank); linear: (rank, in) -> (in, rank), also
            # from a 1x1 convolution's (rank, in, 1, 1). Up: (out, rank[, 1, 1]) -> (rank, out).
            down = down.transpose(2, 3, 1, 0) if spec.convolution else down.reshape(down.shape[:2]).T
            up = up.reshape(up.shape[:2]).T
            if not (np.isfinite(down).all() and np.isfinite(up).all()):
                raise AdapterError(f"layer {spec.module} holds values that are not finite")
            layers.append(LoraLayer(spec.component, spec.kernel, down, up, spec.alpha))
        return tuple(layers)


def read_lora_file(path: Path, names: LayerNames) -> LoraFile:
    """The file's layers matched to the model, from its header. Raises AdapterError naming the problem."""
    handle = _open(path)
    grouped: dict[tuple[str, str], dict[str, str]] = {}
    for key in handle.keys():  # noqa: SIM118  (safe_open handles are not iterable)
        component, module, role = _parse_key(key)
        grouped.setdefault((component, module), {})[role] = key
    if not grouped:
        raise AdapterError("holds no tensors")

    layers = []
    unmatched: list[str] = []
    for (component, module), roles in sorted(grouped.items()):
        missing = [role for role in ("down", "up") if role not in roles]
        if missing:
            raise AdapterError(f"layer {module} has no {' and no '.join(missing)} weight")
        kernel = names.kernel(component, module)
        if kernel is None:
            unmatched.append(f"{component}:{module}")
            continue
        layers.append(_layer(handle, component, module, kernel, roles, names.shape(component, kernel)))
    if unmatched:
        more = ", ..." if len(unmatched) > _MESSAGE_EXAMPLES else ""
        shown = ", ".join(unmatched[:_MESSAGE_EXAMPLES]) + more
        raise AdapterError(
            f"{len(unmatched)} of its {len(grouped)} layers match no layer of the model (e.g. {shown}): "
            "an adapter for another model"
        )
    return LoraFile(path=path, layers=tuple(layers))


def _parse_key(key: str) -> tuple[str, str, str]:
    """(component, module, role) of a tensor name; role is down, up or alpha."""
    if any(kind in key for kind in _OTHER_KINDS):
        raise AdapterError(f"tensor {key} belongs to another kind of adapter (LoHa, LoKr, DoRA): not served")
    for prefix, component in (*_KOHYA_COMPONENTS.items(), *_KOHYA_COMPONENTS_SD1.items()):
        if key.startswith(prefix):
            module, _, kind = key[len(prefix) :].partition(".")
            return component, module, _role(key, kind)
    for prefix in _DIFFUSERS_COMPONENTS:
        if key.startswith(prefix):
            component, rest = prefix[:-1], key[len(prefix) :]
            processor = _PROCESSOR.match(rest)
            if processor:
                attention, projection, direction = processor.groups()
                projection = "to_out.0" if projection == "to_out" else projection
                return component, f"{attention}.{projection}", direction
            for role, kinds in (("down", _DOWN), ("up", _UP), ("alpha", _ALPHA)):
                for kind in kinds:
                    if rest.endswith("." + kind):
                        return component, rest[: -len(kind) - 1], role
            break
    raise AdapterError(f"tensor {key} is not a LoRA tensor of the kohya or diffusers format")


def _role(key: str, kind: str) -> str:
    for role, kinds in (("down", _DOWN), ("up", _UP), ("alpha", _ALPHA)):
        if kind in kinds:
            return role
    raise AdapterError(f"tensor {key} is not a LoRA tensor of the kohya or diffusers format")


def _layer(
    handle: Any,
    component: str,
    module: str,
    kernel: FlaxPath,
    roles: dict[str, str],
    kernel_shape: tuple[int, ...],
) -> LayerSpec:
    down = tuple(handle.get_slice(roles["down"]).get_shape())
    up = tuple(handle.get_slice(roles["up"]).get_shape())
    rank = down[0] if down else 0
    convolution = len(kernel_shape) == 4
    if convolution:  # HWIO kernel: down (rank, in, kh, kw), up (out, rank, 1, 1)
        kh, kw, inputs, outputs = kernel_shape
        fits = down == (rank, inputs, kh, kw) and up == (outputs, rank, 1, 1)
    else:  # (in, out) kernel: down (rank, in), up (out, rank), or their 1x1 convolution forms
        inputs, outputs = kernel_shape
        fits = down in ((rank, inputs), (rank, inputs, 1, 1))
        fits = fits and up in ((outputs, rank), (outputs, rank, 1, 1))
    if rank < 1 or not fits:
        raise AdapterError(
            f"layer {module} has down {down} and up {up}, which do not fit the model's "
            f"{'convolution' if convolution else 'linear'} layer {'/'.join(kernel)} of kernel {kernel_shape}"
        )
    alpha = float(rank)
    if "alpha" in roles:
        value = _tensor(handle, roles["alpha"])
        if value.size != 1 or not math.isfinite(float(value.reshape(()))):
            raise AdapterError(f"layer {module} has an alpha that is not one finite number")
        alpha = float(value.reshape(()))
    return LayerSpec(component, kernel, module, roles["down"], roles["up"], alpha, rank, convolution)


def _open(path: Path) -> Any:
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="numpy")
    except Exception as error:  # the library's errors are not one type
        raise AdapterError(f"not a readable safetensors file: {error}") from None


def _tensor(handle: Any, key: str) -> np.ndarray:
    try:
        return np.asarray(handle.get_tensor(key))
    except Exception as error:
        raise AdapterError(f"cannot read tensor {key}: {error}") from None
