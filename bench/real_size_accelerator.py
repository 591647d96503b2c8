"""SDXL 1.0 base's architecture on one accelerator, beside the seed's recipe on the same chip (not CI).

What issue 8 asks of a GPU or TPU, in one command: at 1024x1024 in bfloat16, the device seconds of one
guided step and one decode for each batch bucket, images/s with 1, 2 and 4 slots busy, the device's peak
memory, MFU (XLA's cost-analysis FLOPs of the programs that made an image / its time / the chip's peak
bf16 FLOP/s), the seed's recipe (`FlaxStableDiffusionXLPipeline`, `jit=True`, bench/seed_recipe.py) at
the same batch sizes, and the time per image against the seed's own per-chip figure (a v5e-4 made 4
images of 20 steps in 2.33 s: 2.33 s per image per chip; 20 x 13.5 + 10.5 = 281 TFLOP per image).

The model is `build-random-model --arch sdxl-base` (random weights, real shapes; built once into
.cache/sdxl-base-random by bench/real_size.py's `ensure_random_sdxl_base`), or `--model DIR`. On this
CPU a small smoke run checks the script itself:

    .venv/bin/python bench/real_size_accelerator.py \\
        --model .cache/bench-sdxl-heavy-vae --resolution 128x128 --steps 4 --dtype float32 --slots 1,2

On an accelerator (the defaults): `python bench/real_size_accelerator.py`. Prints a table, writes
bench/results/real_size_accelerator.json. `--attention xla,flash` (the default) measures each slot count
with both attention implementations (engine/device/attention.py): step and decode seconds, images/s,
MFU, and the memory each needs (the step's and decode's compiled temporaries, and the device's bytes in
use once the engine is ready). Nothing of it runs in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
from bench.timing import best_seconds  # noqa: E402

RESULTS = REPO / "bench" / "results" / "real_size_accelerator.json"
SEED_SECONDS_PER_IMAGE_PER_CHIP = 2.33  # the blog post's v5e-4: 4 images of 20 steps in 2.33 s
# The chip's dense bf16 peak, TFLOP/s, by a part of jax's device_kind (vendor data sheets).
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "v5 lite": 197.0, "v5e": 197.0}


def peak_tflops(device_kind: str) -> float | None:
    return next((tflops for name, tflops in PEAK_BF16_TFLOPS.items() if name in device_kind), None)


def flops_of(compiled) -> float:
    """XLA's cost analysis of a compiled program (a dict, or a list of one dict in older JAX)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list | tuple):
        analysis = analysis[0]
    return float(analysis.get("flops", 0.0))


def engine_images_per_second(engine, busy: int, waves: int, steps: int, resolution) -> float:
    """Images/s of `busy` x `waves` single-image requests submitted at once to an engine with `busy`
    slots: every wave fills the slots, so the figure is a server's throughput with that many slots."""
    from sdxl_server.engine.api import Failed, Finished, GenerationRequest

    total = busy * waves
    done = threading.Semaphore(0)
    failures: list[object] = []

    def listener(event: object) -> None:
        if isinstance(event, Finished | Failed):
            if isinstance(event, Failed):
                failures.append(event)
            done.release()

    began = time.perf_counter()
    for i in range(total):
        engine.submit(
            GenerationRequest(
                request_id=f"accel-{busy}-{i}",
                prompt=f"a photograph of an astronaut riding a horse, number {i}",
                negative_prompt="",
                seed=i,
                num_images=1,
                steps=steps,
                guidance_scale=5.0,
                resolution=resolution,
            ),
            listener,
        )
    for _ in range(total):
        done.acquire()
    if failures:
        raise RuntimeError(f"{len(failures)} requests failed: {failures[:3]}")
    return total / (time.perf_counter() - began)


def temp_bytes(compiled) -> int | None:
    """XLA's temporaries of a compiled program (None where the backend gives no memory analysis)."""
    analysis = compiled.memory_analysis()
    return int(analysis.temp_size_in_bytes) if analysis is not None else None


def measure_engine(
    busy: int, args, model: str, resolution, cache_dir: str, peak: float | None, attention: str = "auto"
) -> dict:
    """One engine with `busy` slots on one device: program times and FLOPs, images/s, MFU, memory."""
    import jax
    import numpy as np
    from sdxl_server.engine import EngineConfig, JaxEngine
    from sdxl_server.engine.device.programs import busy_slots

    began = time.perf_counter()
    engine = JaxEngine(
        EngineConfig(
            model=model,
            resolutions=(resolution,),
            slots_per_device=busy,
            max_devices=1,
            max_queue=busy * args.waves,
            max_steps=max(args.steps, 4),
            default_steps=args.steps,
            dtype=args.dtype,
            compilation_cache_dir=cache_dir,
            attention=attention,
        )
    )
    engine.start()
    device = jax.local_devices()[0]
    in_use = (device.memory_stats() or {}).get("bytes_in_use")
    ready_seconds = time.perf_counter() - began
    programs = engine.compiled_programs().by_resolution[resolution]
    params = engine.compiled_programs().params
    bank = programs.empty_bank
    # One step of every slot: the largest single-step program (its UNet rows: two per guided image).
    # The largest decode the memory plan allowed (max_decode_batch), scaled per image below.
    decode_images = max(programs.decode)
    step = programs.steps[max(key for key in programs.steps if key[0] == 1)]
    decode = programs.decode[decode_images]
    step_seconds = best_seconds(lambda: step(params["unet"], busy_slots(bank.slots)))
    counts = np.full(len(bank.held.sharding.device_set), decode_images, np.int32)  # every device's rows
    decode_seconds = best_seconds(lambda: decode(params["vae"], bank.held, np.int32(0), counts))
    decode_seconds *= busy / decode_images
    step_flops, decode_flops = flops_of(step), flops_of(decode) * busy / decode_images
    rates = [
        engine_images_per_second(engine, busy, args.waves, args.steps, resolution)
        for _ in range(args.repeats)
    ]
    engine.stop()
    rate = statistics.median(rates)
    flops_per_image = (args.steps * step_flops + decode_flops) / busy
    print(
        f"engine, {busy} slots, attention {attention}: {rate:.3f} images/s (ready in {ready_seconds:.0f}s)",
        flush=True,
    )
    return {
        "slots": busy,
        "attention": engine.config.attention,  # resolved for the platform
        "step_temp_bytes": temp_bytes(step),
        "decode_temp_bytes": temp_bytes(decode),
        "device_bytes_in_use_when_ready": in_use,
        "ready_seconds": ready_seconds,
        "guided_step_seconds": step_seconds,
        "decode_seconds": decode_seconds,
        "step_tflop": step_flops / 1e12,
        "decode_tflop": decode_flops / 1e12,
        "engine_images_per_second": rate,
        "engine_rounds": rates,
        "seconds_per_image": 1 / rate,
        "over_seed_per_chip": (1 / rate) / SEED_SECONDS_PER_IMAGE_PER_CHIP,
        "tflop_per_image": flops_per_image / 1e12,
        "mfu": (rate * flops_per_image / (peak * 1e12)) if peak else None,
        "step_mfu": (step_flops / step_seconds / (peak * 1e12)) if peak else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="a diffusers SDXL folder (default: random sdxl-base)")
    parser.add_argument("--resolution", default="1024x1024")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--slots", default="1,2,4", help="slots busy at once, one engine each")
    parser.add_argument("--waves", type=int, default=3, help="batches of requests per slot count")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per figure (median)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the chip's bf16 peak")
    parser.add_argument("--attention", default="xla,flash", help="attention implementations to compare")
    args = parser.parse_args()
    slot_counts = [int(n) for n in args.slots.split(",")]
    attentions = args.attention.split(",")

    import jax
    from sdxl_server.engine.api import Resolution
    from sdxl_server.engine.models.quiet_libraries import silence_library_noise

    from bench.real_size import ensure_random_sdxl_base
    from bench.seed_recipe import SeedRecipe

    silence_library_noise()
    model = args.model or str(ensure_random_sdxl_base())
    resolution = Resolution.parse(args.resolution)
    device = jax.local_devices()[0]
    peak = args.peak_tflops or peak_tflops(device.device_kind)
    cache_dir = os.environ.get("SDXL_COMPILATION_CACHE_DIR", str(REPO / ".cache" / "jax-compilation-cache"))

    rows = [
        measure_engine(busy, args, model, resolution, cache_dir, peak, attention)
        for attention in attentions
        for busy in slot_counts
    ]

    recipe = SeedRecipe(model, 1, dtype=args.dtype)
    recipe_rates: dict[int, float] = {}
    for row in rows:
        batch = row["slots"]
        if batch in recipe_rates:  # the recipe has no attention setting: once per batch size
            row["recipe_images_per_second"] = recipe_rates[batch]
            row["engine_over_recipe"] = row["engine_images_per_second"] / recipe_rates[batch]
            continue
        prompts = [f"a photograph of an astronaut riding a horse, number {i}" for i in range(batch)]

        def generate(batch_prompts=prompts, seed=0):
            return recipe.generate(
                batch_prompts, "", seed, args.steps, 5.0, resolution.height, resolution.width
            )

        began = time.perf_counter()
        generate()  # compiles the fused program for this batch size
        row["recipe_compile_seconds"] = time.perf_counter() - began
        times = []
        for seed in range(args.repeats):
            began = time.perf_counter()
            generate(seed=seed + 1)
            times.append(time.perf_counter() - began)
        row["recipe_images_per_second"] = recipe_rates[batch] = batch / statistics.median(times)
        row["engine_over_recipe"] = row["engine_images_per_second"] / row["recipe_images_per_second"]
        print(f"recipe, batch {batch}: {row['recipe_images_per_second']:.3f} images/s", flush=True)

    memory = device.memory_stats() or {}
    result = {
        "model": model,
        "resolution": str(resolution),
        "steps": args.steps,
        "dtype": args.dtype,
        "device": device.device_kind,
        "peak_bf16_tflops": peak,
        "peak_device_bytes": memory.get("peak_bytes_in_use"),
        "device_bytes_limit": memory.get("bytes_limit"),
        "rows": rows,
        "jax": jax.__version__,
    }
    print(f"\n{device.device_kind}, {resolution}, {args.steps} steps, {args.dtype}")
    print(
        f"{'attention':>9}{'slots':>6}{'step s':>9}{'decode s':>10}{'engine img/s':>14}{'recipe img/s':>14}"
        f"{'ratio':>7}{'MFU':>7}{'s/image':>9}{'vs seed chip':>14}{'step temp GiB':>15}"
    )
    for r in rows:
        mfu = f"{r['mfu']:.2f}" if r["mfu"] is not None else "-"
        temp = f"{r['step_temp_bytes'] / 2**30:.2f}" if r["step_temp_bytes"] is not None else "-"
        print(
            f"{r['attention']:>9}{r['slots']:>6}{r['guided_step_seconds']:>9.3f}{r['decode_seconds']:>10.3f}"
            f"{r['engine_images_per_second']:>14.3f}{r['recipe_images_per_second']:>14.3f}"
            f"{r['engine_over_recipe']:>7.2f}{mfu:>7}{r['seconds_per_image']:>9.3f}"
            f"{r['over_seed_per_chip']:>14.2f}{temp:>15}"
        )
    if result["peak_device_bytes"]:
        print(f"peak device memory: {result['peak_device_bytes'] / 2**30:.1f} GiB")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
