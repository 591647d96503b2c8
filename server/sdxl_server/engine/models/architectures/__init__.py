"""Published SDXL architectures by name: the configs a checkpoint's weights belong to."""

from __future__ import annotations

from types import ModuleType

from sdxl_server.engine.models.architectures import sdxl_base

ARCHITECTURES: dict[str, ModuleType] = {sdxl_base.NAME: sdxl_base}


def architecture_named(name: str) -> ModuleType:
    """The module holding `name`'s configs (see sdxl_base.py for what it defines)."""
    try:
        return ARCHITECTURES[name]
    except KeyError:
        known = ", ".join(sorted(ARCHITECTURES))
        raise ValueError(f"unknown architecture {name!r} (known: {known})") from None
