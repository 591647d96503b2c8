"""How many UNet rows an image takes at each of its steps: the unit the step programs are sized in.

A guided step runs two rows (the unconditional and the conditional prediction, mixed by the guidance
scale); an unguided one runs the conditional row alone, as diffusers' PyTorch pipelines do when
`guidance_scale <= 1`. A request's `guidance_interval` (start, end) limits guidance to the steps i with
start <= i / steps < end (Kynkäänniemi et al., 2024, applied to step fractions): with (0, 0.4) and 20
steps, steps 0..7 are guided and 8..19 take one row.

The host (the boundary plan) and the device (denoise.py, from each slot's `guided_from`/`guided_until`)
must agree on these rows exactly: a step program runs a fixed number of rows, and a row the host did not
count would fall outside it. Both use `guided_steps`. No JAX here.
"""

from __future__ import annotations

import math

import numpy as np

# Fractions arrive as float32 over gRPC: 0.4 is 0.4000000059604645, and 0.4 x 20 must still be step 8.
_FRACTION_SLACK = 1e-6


def guided_steps(guidance_scale: float, interval: tuple[float, float], steps: int) -> tuple[int, int]:
    """[first, end): the steps that run with guidance (an empty range when there is none)."""
    if guidance_scale <= 1:
        return 0, 0
    start, end = interval
    first = min(steps, math.ceil(start * steps - _FRACTION_SLACK))
    until = min(steps, math.ceil(end * steps - _FRACTION_SLACK))
    return (first, until) if until > first else (0, 0)


def rows_at(guided: tuple[int, int], steps: int, step: int) -> int:
    """UNet rows of step `step` (0 once the image has run all its `steps`)."""
    if step >= steps:
        return 0
    first, until = guided
    return 2 if first <= step < until else 1


def rows_over(guided: tuple[int, int], steps: int, start: int, count: int) -> np.ndarray:
    """`rows_at` for the steps start, start + 1, ..., start + count - 1, as an int32 array."""
    at = np.arange(start, start + count)
    first, until = guided
    return np.where(at < steps, 1 + ((at >= first) & (at < until)), 0).astype(np.int32)


def row_steps(guided: tuple[int, int], steps: int, start: int = 0) -> int:
    """UNet rows over the image's steps from `start` on (the whole image by default): its cost in units
    of one row-step."""
    first, until = guided
    return max(steps - start, 0) + max(until - max(first, start), 0)


def peak_rows(guided: tuple[int, int]) -> int:
    """The most UNet rows the image takes at any one step: 2 if any step is guided, else 1."""
    first, until = guided
    return 2 if until > first else 1
