"""Where a lone finished image should be decoded: the lever of issue 8, measured before it was built.

The engine decodes with one SPMD program over every device (`decode[b]`, a `shard_map`). Until the
eleventh session every device decoded the busiest device's count, so when only one device held a
finished image the others decoded padding in step with it. The alternatives: decode where the slot
lives, with a program on that device alone, or (what the engine now does) the same SPMD program with a
count per device, 0 skipping the VAE. This times, on the bench model (2 CPU devices, 128x128), best of
7 each:

* the SPMD decode of bucket 1 on every device, of bucket 2 on every device, and of bucket 1 on device 0
  alone (device 1's count 0);
* the same decode as a program on device 0 alone (1 and 2 images);
* an SPMD step of bucket 1 dispatched right after each kind of decode of one image: how much of the
  decode the other device's step hides.

    .venv/bin/python bench/decode_placement.py

Prints a table, writes bench/results/decode_placement.json. Not a goal of its own: a figure to decide by.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")

import json

import jax
import numpy as np
from sdxl_server.engine import JaxEngine
from sdxl_server.engine.device.denoise import decode_latents
from sdxl_server.engine.device.programs import busy_slots

from bench import engine_vs_recipe as bench
from bench.bench_model import prepare_side_by_side
from bench.timing import best_seconds as timed

RESULTS = bench.REPO / "bench" / "results" / "decode_placement.json"


def best(run) -> float:
    return timed(run, repeats=7)


def main() -> None:
    prepare_side_by_side(bench.DEVICES)
    engine = JaxEngine(bench.engine_config("continuous", steps_per_dispatch=1))
    engine.start()
    programs = engine.compiled_programs().by_resolution[bench.RESOLUTION]
    params = engine.compiled_programs().params
    bank = programs.empty_bank
    busy = busy_slots(bank.slots)  # on the empty bank a step skips its UNet (nothing to time)
    model = engine._model
    device = jax.local_devices()[0]
    vae_here = jax.device_put(params["vae"], device)
    held_here = jax.device_put(bank.held[:2], device)
    decode_here = jax.jit(lambda p, h, n: decode_latents(model, p, h[:n]), static_argnums=2)

    def step():
        return programs.steps[(1, 2)](params["unet"], busy)  # 2 UNet rows: one guided image

    def spmd_decode(b: int, counts: list[int]):
        """decode[b] where device d decodes counts[d] rows (0: it skips the VAE)."""
        return programs.decode[b](params["vae"], bank.held, np.int32(0), np.array(counts, np.int32))

    figures = {
        "spmd_decode_1": best(lambda: spmd_decode(1, [1, 1])),
        "spmd_decode_2": best(lambda: spmd_decode(2, [2, 2])),
        "spmd_decode_1_on_one_device": best(lambda: spmd_decode(1, [1, 0])),
        "one_device_decode_1": best(lambda: decode_here(vae_here, held_here, 1)),
        "one_device_decode_2": best(lambda: decode_here(vae_here, held_here, 2)),
        "spmd_step_1": best(step),
        "spmd_decode_1_then_step": best(lambda: (spmd_decode(1, [1, 1]), step())),
        "spmd_decode_1_on_one_device_then_step": best(lambda: (spmd_decode(1, [1, 0]), step())),
        "one_device_decode_1_then_step": best(lambda: (decode_here(vae_here, held_here, 1), step())),
    }
    engine.stop()
    print(f"bench model, {bench.RESOLUTION}, 2 CPU devices; best of 7, seconds")
    for name, seconds in figures.items():
        print(f"{name:<36}{seconds:>8.4f}")
    saved = figures["spmd_decode_1_then_step"] - figures["one_device_decode_1_then_step"]
    print(
        f"decoding a lone image on its own device saves {saved:.4f} s per finished image "
        f"({saved / figures['spmd_step_1']:.2f} of a step) when a step follows it"
    )
    skipped = figures["spmd_decode_1_then_step"] - figures["spmd_decode_1_on_one_device_then_step"]
    print(f"the per-device count (device 1 skips its VAE) saves {skipped:.4f} s in the same place")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {"seconds": figures, "saved_per_lone_decode": saved, "saved_by_the_count": skipped}, indent=2
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
