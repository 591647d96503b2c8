"""A request's LoRA adapters as admission checked them (adapter_directory.check_adapters): what its
images carry through the queue into their slots. Imports nothing heavy: the batching modules, which
import no JAX, hold it."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sdxl_server.engine.adapters.lora_file import LoraFile


@dataclasses.dataclass(frozen=True)
class RequestAdapters:
    """The files, in the request's order, and their scales; empty for a request without adapters."""

    files: tuple[LoraFile, ...] = ()
    scales: tuple[float, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.files)

    def on_text_encoders(self) -> tuple[tuple[LoraFile, float], ...]:
        """The adapters that change a text encoder, with their scales: what the prompt's embeddings
        depend on besides its tokens (the prompt cache's key)."""
        return tuple(
            (lora, scale)
            for lora, scale in zip(self.files, self.scales, strict=True)
            if any(component != "unet" for component in lora.components)
        )

    @property
    def text_encoders(self) -> bool:
        return bool(self.on_text_encoders())


NO_ADAPTERS = RequestAdapters()
