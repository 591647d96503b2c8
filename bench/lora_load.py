"""First use of a LoRA adapter, before the engine applies it per request: how long a 50 MB and a 400 MB
SDXL adapter take from file to the device's adapter bank (issue 23's benchmark, the load part).

Real SDXL 1.0 base layer shapes (traced from its configs, no weights), random kohya-format fp16 adapters
over every layer the bank covers (the UNet's transformer linear layers, both text encoders'), with the
rank that gives the file size (random down factors, zero up factors: the
values do not change the cost). Each phase timed once, as a first use is (the device write's compile is
timed apart, once per bank shape, and is not part of a load):

- check: `read_lora_file`, the header check the adapter folder does when a file appears;
- read: `LoraFile.load`, the tensors as float32 in the Flax orientation;
- pack: `BankLayout.place` for each component (rank padded to the bank's maximum, alpha/rank folded in);
- write: `load_into_place` on the device (CPU here), until the arrays are ready.

    .venv/bin/python bench/lora_load.py [--sizes-mb 50,400]

Prints a table and writes bench/results/lora_load.json. A load overlapped with serving (the read and
pack on the loader's thread, the write at a step boundary) is bench/lora_serving.py's latency part.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
MB = 10**6
_KOHYA = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


def sdxl_layer_names() -> Any:
    from sdxl_server.engine.adapters.layer_names import LayerNames
    from sdxl_server.engine.models.checkpoints.assemble import build_modules
    from sdxl_server.engine.models.checkpoints.component_configs import resolve_configs
    from sdxl_server.engine.models.checkpoints.layout import expected_shapes
    from sdxl_server.engine.models.quiet_libraries import silence_library_noise

    silence_library_noise()
    configs = resolve_configs("sdxl-base")
    unet, _, text_encoder, text_encoder_2 = build_modules(configs, dtype=np.float32, split_head_dim=False)
    rng = jax.random.PRNGKey(0)
    shapes = {"unet": expected_shapes(jax.eval_shape(unet.init_weights, rng))}
    for component, module in (("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2)):
        positions = int(module.config.max_position_embeddings)
        traced = jax.eval_shape(lambda k, m=module, n=positions: m.init_weights(k, (1, n)), rng)
        shapes[component] = expected_shapes(traced)
    kernels = {
        component: {path: tuple(s.shape) for path, s in flat.items() if path[-1] == "kernel"}
        for component, flat in shapes.items()
    }
    return LayerNames(kernels, configs.configs["unet"])


def write_adapter(names: Any, rank: int, path: Path) -> int:
    """A random kohya adapter of `rank` over every covered layer; returns the file's bytes."""
    from safetensors.numpy import save_file
    from sdxl_server.engine.adapters.adapter_bank import covered_kernels

    rng = np.random.default_rng(0)
    state = {}
    for component, prefix in _KOHYA.items():
        for kernel in covered_kernels(names, component):
            inputs, outputs = names.shape(component, kernel)
            name = prefix + "_".join(kernel[:-1])
            state[f"{name}.lora_down.weight"] = rng.standard_normal((rank, inputs), np.float32).astype(
                np.float16
            )
            state[f"{name}.lora_up.weight"] = np.zeros((outputs, rank), np.float16)
            state[f"{name}.alpha"] = np.array(rank, np.float16)
    save_file(state, str(path))
    return path.stat().st_size


def rank_for(names: Any, megabytes: float) -> int:
    from sdxl_server.engine.adapters.adapter_bank import covered_kernels

    per_rank = sum(
        2 * sum(names.shape(component, kernel))
        for component in _KOHYA
        for kernel in covered_kernels(names, component)
    )
    return max(1, round(megabytes * MB / per_rank))


def measure(names: Any, megabytes: float, directory: Path) -> dict[str, Any]:
    from sdxl_server.engine.adapters.adapter_bank import BankLayout
    from sdxl_server.engine.adapters.device_bank import empty_device_bank, load_into_place
    from sdxl_server.engine.adapters.lora_file import read_lora_file

    rank = rank_for(names, megabytes)
    path = directory / f"adapter-{int(megabytes)}mb.safetensors"
    size = write_adapter(names, rank, path)
    layouts = {c: BankLayout.of(names, c, places=1, max_rank=rank) for c in _KOHYA}
    banks = {c: empty_device_bank(layout, np.float32) for c, layout in layouts.items()}

    began = time.perf_counter()  # compile the write once per bank shape: not part of a load
    for component, layout in layouts.items():
        banks[component] = load_into_place(banks[component], 0, layout.place(()))
    jax.block_until_ready(banks)
    compile_seconds = time.perf_counter() - began

    timings = {}
    began = time.perf_counter()
    lora = read_lora_file(path, names)
    timings["check"] = time.perf_counter() - began
    began = time.perf_counter()
    layers = lora.load()
    timings["read"] = time.perf_counter() - began
    began = time.perf_counter()
    contents = {c: layout.place(layers) for c, layout in layouts.items()}
    timings["pack"] = time.perf_counter() - began
    began = time.perf_counter()
    for component in layouts:
        banks[component] = load_into_place(banks[component], 0, contents[component])
    jax.block_until_ready(banks)
    timings["write"] = time.perf_counter() - began
    return {
        "file_mb": size / MB,
        "rank": rank,
        "layers": len(lora.layers),
        **{f"{phase}_seconds": seconds for phase, seconds in timings.items()},
        "load_seconds": sum(timings.values()),
        "write_compile_seconds": compile_seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes-mb", default="50,400", help="adapter file sizes, MB")
    args = parser.parse_args()
    names = sdxl_layer_names()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for megabytes in (float(x) for x in args.sizes_mb.split(",")):
            rows.append(measure(names, megabytes, Path(tmp)))
    header = (
        f"{'file MB':>8} {'rank':>5} {'layers':>6} {'check s':>8} {'read s':>7} {'pack s':>7} {'write s':>8} "
        f"{'load s':>7}"
    )
    print(
        f"SDXL LoRA first use, file to device bank ({jax.devices()[0].platform}, "
        f"{platform.processor() or platform.machine()})"
    )
    print(header)
    for r in rows:
        print(
            f"{r['file_mb']:8.1f} {r['rank']:5d} {r['layers']:6d} {r['check_seconds']:8.3f} "
            f"{r['read_seconds']:7.3f} "
            f"{r['pack_seconds']:7.3f} {r['write_seconds']:8.3f} {r['load_seconds']:7.3f}"
        )
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "lora_load.json"
    out.write_text(json.dumps({"device": jax.devices()[0].platform, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
