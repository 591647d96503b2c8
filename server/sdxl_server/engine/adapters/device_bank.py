"""The adapter bank on the device: one pair of arrays per covered layer (adapter_bank.BankLayout), and
one compiled program that writes an adapter into a place. The place is a traced argument and the
contents always have the same shapes, so loading any adapter into any place reuses one executable:
loading never recompiles, and the step programs, which take the bank as an argument, never see a new
shape either.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sdxl_server.engine.adapters.adapter_bank import BankLayout, ModulePath

DeviceBank = dict[ModulePath, tuple[jax.Array, jax.Array]]
Contents = Mapping[ModulePath, tuple[np.ndarray, np.ndarray]]


def empty_device_bank(layout: BankLayout, dtype: Any, sharding: Any = None) -> DeviceBank:
    """Every place zero, placed with `sharding` (replicated over the mesh, as the parameters are)."""
    host = layout.empty(np.dtype(dtype))
    return jax.device_put(host, sharding) if sharding is not None else jax.device_put(host)


def _write(bank: DeviceBank, place: jax.Array, contents: DeviceBank) -> DeviceBank:
    return {
        module: (down.at[place].set(contents[module][0]), up.at[place].set(contents[module][1]))
        for module, (down, up) in bank.items()
    }


# The bank is donated: a load updates it in place instead of holding two copies.
write_place = jax.jit(_write, donate_argnums=0)


def load_into_place(bank: DeviceBank, place: int, contents: Contents) -> DeviceBank:
    """`bank` with `contents` (BankLayout.place's) in `place`; the old `bank` must not be used again."""
    dtype = next(iter(bank.values()))[0].dtype
    cast = {m: (jnp.asarray(d, dtype), jnp.asarray(u, dtype)) for m, (d, u) in contents.items()}
    return write_place(bank, jnp.int32(place), cast)
