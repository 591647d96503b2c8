"""`--attention xla` against `flash`: what chose each platform's default (engine/device/attention.py).

Two tables, each printed and written as JSON under bench/results/:

* CPU (`.venv`): the demo UNet, which attends at full latent resolution, on one guided image (2 rows) at
  each size: XLA's analysed temporaries and the best of 3 timed calls, for both attentions.

      .venv/bin/python bench/attention.py [--sizes 64,256,512]

* v5e (`.venv-tpu`, libtpu installed by `make tpu-install`; no TPU needed): single attentions at SDXL's
  shapes, compiled for one v5e chip; temporaries, bytes accessed and FLOPs from the compiled program,
  beside the analytic FLOPs (`attention_flops`). Compiled only: nothing runs on a TPU here.

      .venv-tpu/bin/python bench/attention.py --v5e
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
MIB = 2**20

# (what, rows, query tokens, key tokens, heads, head dim): SDXL 1.0 base's attentions on one guided image.
V5E_CASES = [
    ("1024x1024, 64x64 level, self", 2, 4096, 4096, 10, 64),
    ("1024x1024, 64x64 level, cross", 2, 4096, 77, 10, 64),
    ("1024x1024, 32x32 level, self", 2, 1024, 1024, 20, 64),
    ("1152x896, 72x56 level, self", 2, 4032, 4032, 10, 64),
    ("1024x1024, VAE mid block", 1, 16384, 16384, 1, 512),
]


def cpu_table(sizes: list[int]) -> list[dict[str, Any]]:
    import jax
    import jax.numpy as jnp
    from sdxl_server.engine.models.loader import load_model
    from sdxl_server.engine.models.model_source import resolve_model
    from sdxl_server.engine.models.quiet_libraries import silence_library_noise

    from bench.timing import best_seconds

    silence_library_noise()
    model = load_model(resolve_model("demo", None), "float32")
    unet = model.pipeline.unet
    rows = []
    for size in sizes:
        latent = size // model.vae_scale_factor
        sample = jnp.ones((2, model.latent_channels, latent, latent), jnp.float32)
        embeds, pooled = jnp.ones((2, 77, 64)), jnp.ones((2, 32))
        added = {"text_embeds": pooled, "time_ids": jnp.ones((2, 6))}
        for attention in ("xla", "flash"):
            apply = functools.partial(_guided_unet, unet, attention, embeds, added)
            compiled = jax.jit(apply).lower(model.params["unet"], sample).compile()
            temp = compiled.memory_analysis().temp_size_in_bytes
            seconds = best_seconds(functools.partial(compiled, model.params["unet"], sample), repeats=3)
            rows.append({"size": size, "tokens": latent * latent, "attention": attention,
                         "temp_mib": temp / MIB, "step_seconds": seconds})  # fmt: skip
            print(f"| {size}x{size} | {latent * latent} | {attention} | {temp / MIB:.0f} | {seconds:.3f} |")
    return rows


def _guided_unet(unet: Any, attention: str, embeds: Any, added: Any, params: Any, sample: Any) -> Any:
    import jax.numpy as jnp
    from sdxl_server.engine.device.attention import attention_kernel

    with attention_kernel(attention, "cpu"):
        return unet.apply({"params": params}, sample, jnp.array([500, 500]), embeds, added).sample


def _scaled(kernel: Any, scale: float, q: Any, k: Any, v: Any) -> Any:
    return kernel(q, k, v, scale)


def v5e_table() -> list[dict[str, Any]]:
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    import jax
    import jax.numpy as jnp
    from jax.experimental import topologies
    from jax.sharding import SingleDeviceSharding
    from sdxl_server.engine.device.attention import attention_flops, reference_attention, tpu_flash_attention

    topology = topologies.get_topology_desc(
        platform="tpu", topology_name="v5e:1x1", chip_config_name="default",
        chips_per_host_bounds=(1, 1, 1), num_slices=1,
    )  # fmt: skip
    sharding = SingleDeviceSharding(topology.devices[0])
    rows = []
    for what, batch, q_len, k_len, heads, head_dim in V5E_CASES:
        shapes = [(batch, q_len, heads, head_dim), *[(batch, k_len, heads, head_dim)] * 2]
        args = [jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=sharding) for shape in shapes]
        for attention, kernel in (("xla", reference_attention), ("flash", tpu_flash_attention)):
            began = time.perf_counter()
            compiled = jax.jit(functools.partial(_scaled, kernel, head_dim**-0.5)).lower(*args).compile()
            seconds = time.perf_counter() - began
            cost = compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, list) else cost
            row = {
                "attention_of": what, "attention": attention,
                "temp_mib": compiled.memory_analysis().temp_size_in_bytes / MIB,
                "gb_accessed": cost.get("bytes accessed", 0.0) / 1e9,
                "gflop_xla": cost.get("flops", 0.0) / 1e9,
                "gflop_analytic": attention_flops(batch, heads, q_len, k_len, head_dim) / 1e9,
                "compile_seconds": seconds,
            }  # fmt: skip
            rows.append(row)
            print(f"| {what} | {attention} | {row['temp_mib']:.0f} | {row['gb_accessed']:.2f} | "
                  f"{row['gflop_xla']:.1f} | {row['gflop_analytic']:.1f} |")  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="64,256,512", help="square sizes in pixels for the CPU table")
    parser.add_argument("--v5e", action="store_true", help="compile SDXL's attentions for v5e (needs libtpu)")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.v5e:
        print("| attention of | impl | temporaries MiB | GB accessed | GFLOP (XLA) | GFLOP (analytic) |")
        print("| --- | --- | ---: | ---: | ---: | ---: |")
        rows = v5e_table()
        (RESULTS / "attention_v5e.json").write_text(json.dumps(rows, indent=2) + "\n")
        return
    print("| size | tokens at level 0 | attention | temporaries MiB | guided UNet call, s (best of 3) |")
    print("| --- | ---: | --- | ---: | ---: |")
    rows = cpu_table([int(size) for size in args.sizes.split(",")])
    (RESULTS / "attention_cpu.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
