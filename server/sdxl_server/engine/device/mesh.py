"""The device mesh: parameters replicated, batch slots sharded along the one axis "data".

1 CPU device, 4 simulated CPU devices, a v5e-4 and a v5e-8 run the same programs; only the mesh differs.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sdxl_server.engine.settings import SettingError

DATA_AXIS = "data"


def make_mesh(max_devices: int | None = None, first_device: int = 0) -> Mesh:
    """The local devices `first_device`, `first_device` + 1, ..., `max_devices` of them (None: all)."""
    local = jax.local_devices()
    if first_device >= len(local):
        raise SettingError("first_device", f"is {first_device}, but this host has {len(local)} devices")
    devices = local[first_device:]
    if max_devices is not None:
        devices = devices[:max_devices]
    return Mesh(np.array(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def slot_sharded(mesh: Mesh) -> NamedSharding:
    """Leading axis split over the devices: each device holds its own slots."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))
