"""The device mesh: parameters replicated, batch slots sharded along the one axis "data".

1 CPU device, 4 simulated CPU devices, a v5e-4 and a v5e-8 run the same programs; only the mesh differs.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(max_devices: int | None = None) -> Mesh:
    devices = jax.local_devices()
    if max_devices is not None:
        devices = devices[:max_devices]
    return Mesh(np.array(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def slot_sharded(mesh: Mesh) -> NamedSharding:
    """Leading axis split over the devices: each device holds its own slots."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))
