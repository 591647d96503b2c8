"""`--fuse-lora FILE[:SCALE]`: adapters merged into the base weights at start (no JAX, no numpy here:
the server's settings parse it before anything heavy is imported)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class FusedLora:
    """One adapter to merge: W + scale * alpha/rank * up @ down, before the programs are compiled."""

    path: str
    scale: float = 1.0

    def __str__(self) -> str:
        return f"{self.path}:{self.scale:g}"


def parse_fused_loras(text: str) -> tuple[FusedLora, ...]:
    """`FILE[:SCALE]` items separated by commas (a repeated flag arrives joined this way). A trailing
    `:SCALE` is read only when it is a number, so that a path may hold colons."""
    fused = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        path, colon, tail = item.rpartition(":")
        scale = 1.0
        if colon and path:
            try:
                scale = float(tail)
            except ValueError:
                path = item
        else:
            path = item
        if not math.isfinite(scale):
            raise ValueError(f"{item!r}: the scale must be a finite number")
        fused.append(FusedLora(path, scale))
    return tuple(fused)


def fused_lora_problem(fused: FusedLora) -> str | None:
    """What makes a --fuse-lora item unusable before the model loads (checked with the settings)."""
    if not Path(fused.path).expanduser().is_file():
        return f"{fused.path} is not a file"
    return None
