"""The slots a step's cost is timed on (the warm-up's estimates): busy on every device, because a step
over a block with no active slot skips its UNet (denoise.py) and the empty bank has none."""

from __future__ import annotations

import numpy as np
from sdxl_server.engine.batching.buckets import rows_per_device
from sdxl_server.engine.device.denoise import slot_rows
from sdxl_server.engine.device.programs import busy_slots


def test_busy_slots_fill_the_largest_row_bucket_of_every_device_and_the_step_runs_them_all(engine):
    programs = engine.compiled_programs()
    per = rows_per_device(engine.config.slots_per_device)  # slots in a device's block
    for resolution_programs in programs.by_resolution.values():
        empty = resolution_programs.empty_bank.slots
        largest = resolution_programs.row_buckets[-1]
        busy = busy_slots(empty)
        assert not np.asarray(slot_rows(empty)[0]).any()  # nothing a step would run
        active, _guided, rows = (np.asarray(x) for x in slot_rows(busy))
        assert active.all()
        assert (rows.reshape(-1, per).sum(axis=1) == largest).all()
        assert busy.num_steps.sharding == empty.num_steps.sharding  # what the compiled step takes
        _latents, _history, step = resolution_programs.steps[(1, largest)](programs.params["unet"], busy)
        assert (np.asarray(step) == 1).all()  # every slot of every block took its step
