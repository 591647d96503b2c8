"""The JAX SDXL engine (no gRPC here). See docs/ARCHITECTURE.md, "The engine".

``JaxEngine`` is imported lazily so that ``from sdxl_server.engine import EngineConfig`` (and the
``api`` module) stay free of JAX for the service layer and light tools.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sdxl_server.engine.settings import EngineConfig

if TYPE_CHECKING:
    from sdxl_server.engine.jax_engine import JaxEngine

__all__ = ["EngineConfig", "JaxEngine"]


def __getattr__(name: str) -> Any:
    if name == "JaxEngine":
        from sdxl_server.engine.jax_engine import JaxEngine

        return JaxEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
