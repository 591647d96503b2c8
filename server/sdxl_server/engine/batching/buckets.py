"""Batch buckets: the few per-device batch sizes each program is compiled for.

A boundary runs the smallest compiled size that covers its work (the busy slots' UNet rows for a step,
finished images for a decode), so that a lone request costs what a batch of one costs and a full bank
what the recipe's batch costs. Powers of two keep the count logarithmic in the slots per device (1, 2,
4, ..., and the slots per device itself), which bounds warm-up compile time. Steps per dispatch use the
same sizes up to K, and a dispatch runs the largest that no slot overshoots.
"""

from __future__ import annotations


def bucket_sizes(per_device: int) -> tuple[int, ...]:
    """1, 2, 4, ... below `per_device`, then `per_device` itself."""
    if per_device < 1:
        raise ValueError("per_device must be at least 1")
    sizes, size = [], 1
    while size < per_device:
        sizes.append(size)
        size *= 2
    sizes.append(per_device)
    return tuple(sizes)


def rows_per_device(slots_per_device: int) -> int:
    """A device's capacity, in UNet rows per step: two (one guided image's) for each of the operator's
    `slots_per_device`. It is also the most images a device block holds, since every image takes at
    least one row at each of its steps: 2P unguided images share a step as P guided ones do."""
    return 2 * slots_per_device


def row_bucket_sizes(slots_per_device: int) -> tuple[int, ...]:
    """The UNet row counts a step program is compiled for: 1, 2, 4, ... up to the device's row capacity
    2P, so that a lone unguided image runs one row, and one row short of it, 2P - 1.

    2P - 1 rows is the commonest partial load once guidance varies: a full device whose guided image has
    left its guidance interval, or a guided image among unguided ones. Padded to 2P it would pay a row
    that computes nothing at every such step; where a step costs about its rows (a CPU, or SDXL at 1024x1024
    on a TPU, where a step's FLOPs grow with its rows) that is 1/(2P) of the step. One more program per
    steps-per-dispatch size, not a bucket for every row count, keeps the warm-up compile bounded."""
    capacity = rows_per_device(slots_per_device)
    return tuple(sorted({*bucket_sizes(capacity), capacity - 1}))


def covering_bucket(sizes: tuple[int, ...], needed: int) -> int:
    """The smallest size in `sizes` (ascending) that holds `needed` rows."""
    for size in sizes:
        if size >= needed:
            return size
    raise ValueError(f"{needed} rows exceed the largest bucket {sizes[-1]}")


def largest_fitting(sizes: tuple[int, ...], limit: int) -> int:
    """The largest size in `sizes` (ascending, starting at 1) not above `limit`; 1 if none is."""
    return max((size for size in sizes if size <= limit), default=1)
