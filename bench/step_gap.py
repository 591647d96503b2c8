"""Where the engine's CPU per image goes against the seed's recipe at 8 steps, program by program.

The saturation part of bench/served_vs_recipe.py (bench model, 256x256, 2 CPU devices x 2 slots, guidance
7.5, 8 steps, K=4) finds the engine spending a few percent more CPU per image than the recipe with its
batches full. Here each side's compiled programs are measured alone, on the same devices in one process:

* XLA's cost analysis (FLOPs and bytes accessed, per device) of our step programs at the full row bucket
  and of the recipe's pmap'ed program with its denoising loop of 4 and 8 steps and its latents out, so
  that the difference of the two is 4 of its steps and nothing else;
* wall and CPU seconds (this process's, XLA's threads included) of each program, timed round-robin, one
  call of each per repeat, medians: our step (k=4 and k=1, full bucket), insert, rearrange, decode,
  encode; the recipe's whole batch, its latents-only programs of 4 and 8 steps (their difference: 4
  steps; the rest: text encoders, noise and schedule), and its whole `generate` (tokenizers and PIL
  included);
* an in-process saturated run of the engine (8 in flight), its programs counted per image from the
  trace and priced with the times above, beside its measured CPU per image: what the programs explain
  and what is host time.

    XLA_FLAGS=--xla_force_host_platform_device_count=2 .venv/bin/python bench/step_gap.py [--repeats 9]

Prints tables, writes bench/results/step_gap.json.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")

import argparse
import collections
import json
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.served_vs_recipe import (
    BENCH_MODEL_DIR,
    DEVICES,
    GUIDANCE,
    SLOTS_PER_DEVICE,
    InProcess,
    engine_config,
    process_cpu_seconds,
    prompt,
    say,
)

RESULTS = Path(__file__).resolve().parent / "results" / "step_gap.json"
SIZE = (256, 256)
STEPS = 8
K = 4


def cost(compiled: Any) -> dict[str, float]:
    """FLOPs and bytes accessed of one compiled program, per device (an SPMD or pmap module is one
    device's program)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):  # older JAX: one dict per module
        analysis = analysis[0]
    return {"flops": float(analysis.get("flops", 0.0)), "bytes": float(analysis.get("bytes accessed", 0.0))}


def timed(calls: dict[str, Callable[[], Any]], repeats: int) -> dict[str, dict[str, float]]:
    """Median wall and CPU seconds of each call (waited for on the device), round-robin after one
    untimed call each, so that the shared machine's drift reaches them all alike."""
    import jax

    for call in calls.values():
        jax.block_until_ready(call())
    walls: dict[str, list[float]] = {name: [] for name in calls}
    cpus: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            began, cpu = time.perf_counter(), process_cpu_seconds()
            jax.block_until_ready(call())
            cpus[name].append(process_cpu_seconds() - cpu)
            walls[name].append(time.perf_counter() - began)
    return {
        name: {"wall": statistics.median(walls[name]), "cpu": statistics.median(cpus[name])} for name in calls
    }


def engine_calls(
    engine: Any, steps: set[tuple[int, int]]
) -> tuple[dict[str, Callable[[], Any]], dict[str, dict[str, float]]]:
    """Our programs at the bench's resolution and their cost analyses: the step programs `steps` ((k,
    rows)) and those of k=K and 1 at the full row bucket, one decode, insert, rearrange and encode.
    The steps run on a bank whose every slot is busy (`busy_slots`: one unguided row a slot, the
    full bucket on every device), so that a step program that skips a block with no image still runs
    its whole bucket; the other programs on the empty bank (their cost is their shapes')."""
    from sdxl_server.engine.api import Resolution
    from sdxl_server.engine.batching.buckets import rows_per_device
    from sdxl_server.engine.device.programs import Rearrangement, SlotUpdate, busy_slots
    from sdxl_server.engine.sampling import update as sampler_update

    programs = engine.compiled_programs()
    mine = programs.by_resolution[Resolution(*SIZE)]
    params = programs.params
    unet, vae = params["unet"], params["vae"]
    text = {"text_encoder": params["text_encoder"], "text_encoder_2": params["text_encoder_2"]}
    bank = mine.empty_bank
    busy = busy_slots(bank.slots)
    full = mine.row_buckets[-1]
    per = rows_per_device(SLOTS_PER_DEVICE)
    ids = np.zeros((2, 2, engine._model.max_tokens), np.int32)
    embeds, pooled = programs.encode(text, ids)
    max_steps = bank.slots.timesteps.shape[1]
    update = SlotUpdate(
        slot=np.int32(1), seed=np.uint32(7), prompt_embeds=embeds, pooled=pooled,
        zero_negative=np.bool_(True), guidance=np.float32(GUIDANCE), guided_from=np.int32(0),
        guided_until=np.int32(STEPS), timesteps=np.arange(max_steps, dtype=np.int32),
        coefficients=np.ones((max_steps, len(sampler_update.COEFFICIENTS)), np.float32),
        num_steps=np.int32(STEPS), init_noise_sigma=np.float32(1.0),
        lora_places=np.zeros(bank.slots.lora_places.shape[1], np.int32),
        lora_scales=np.zeros(bank.slots.lora_scales.shape[1], np.float32),
    )  # fmt: skip
    unchanged = np.tile(np.arange(per, dtype=np.int32), DEVICES)
    nothing = np.zeros(per * DEVICES, bool)
    plan = Rearrangement(unchanged, nothing, np.zeros_like(unchanged), nothing)
    two, one = np.full(DEVICES, 2, np.int32), np.full(DEVICES, 1, np.int32)

    def step(k: int, rows: int) -> Callable[[], Any]:
        return lambda: mine.steps[(k, rows)](unet, busy)

    programs_of = {
        f"ours step k={k} rows={rows}": mine.steps[(k, rows)]
        for k, rows in sorted(steps | {(K, full), (1, full)})
    }
    calls = {
        name: step(*key)
        for name, key in zip(programs_of, sorted(steps | {(K, full), (1, full)}), strict=True)
    }
    calls.update({
        "ours decode 2 a device": lambda: mine.decode[2](vae, bank.held, np.int32(0), two),
        "ours decode 1 a device": lambda: mine.decode[1](vae, bank.held, np.int32(0), one),
        "ours insert": lambda: mine.insert(bank.slots, update),
        "ours rearrange": lambda: mine.rearrange(bank, plan),
        "ours encode": lambda: programs.encode(text, ids),
    })  # fmt: skip
    programs_of.update({
        "ours decode 2 a device": mine.decode[2], "ours decode 1 a device": mine.decode[1],
        "ours insert": mine.insert, "ours rearrange": mine.rearrange, "ours encode": programs.encode,
    })  # fmt: skip
    costs = {name: cost(program) for name, program in programs_of.items()}
    return calls, costs


def recipe_calls(recipe: Any) -> tuple[dict[str, Callable[[], Any]], dict[str, dict[str, float]]]:
    """The recipe's pmap'ed program (diffusers' `_p_generate`) for a batch of 2 a device: whole, and with
    its latents out after 4 and 8 steps; and its whole `generate`, host work included."""
    import jax
    import jax.numpy as jnp
    from diffusers.pipelines.stable_diffusion_xl import pipeline_flax_stable_diffusion_xl as sdxl
    from flax.jax_utils import replicate

    pipeline, devices = recipe.pipeline, recipe.devices
    prompts = [prompt(i) for i in range(SLOTS_PER_DEVICE)]
    p_ids = replicate(pipeline.prepare_inputs(prompts), devices=devices)
    p_neg = replicate(pipeline.prepare_inputs([""] * SLOTS_PER_DEVICE), devices=devices)
    rng = jax.random.split(jax.random.PRNGKey(0), len(devices))
    height, width = SIZE[1], SIZE[0]

    def run(steps: int, latents_out: bool) -> Callable[[], Any]:
        return lambda: pipeline(
            p_ids, recipe.p_params, rng, num_inference_steps=steps, neg_prompt_ids=p_neg,
            guidance_scale=GUIDANCE, height=height, width=width, jit=True,
            output_type="latent" if latents_out else None,
        ).images  # fmt: skip

    guidance = jnp.array([GUIDANCE] * len(devices))[:, None]

    def lowered(steps: int, latents_out: bool) -> Any:
        return sdxl._p_generate.lower(
            pipeline, p_ids, recipe.p_params, rng, steps, height, width, guidance, None, p_neg, latents_out
        ).compile()

    calls = {
        f"recipe batch ({STEPS} steps + VAE)": run(STEPS, False),
        f"recipe {STEPS} steps, latents out": run(STEPS, True),
        "recipe 4 steps, latents out": run(4, True),
        "recipe generate (tokenize, program, PIL)": lambda: recipe.generate(
            prompts, "", 0, STEPS, GUIDANCE, height, width
        ),
    }
    costs = {
        f"recipe batch ({STEPS} steps + VAE)": cost(lowered(STEPS, False)),
        f"recipe {STEPS} steps, latents out": cost(lowered(STEPS, True)),
        "recipe 4 steps, latents out": cost(lowered(4, True)),
    }
    return calls, costs


def thread_cpu() -> dict[str, float]:
    """CPU seconds (user + system) of this process's threads so far, summed by what they are: each
    Python thread by its name (numbers dropped: the image workers are one group), every other thread
    (XLA's compute and runtime threads) by its kernel name."""
    import threading

    def group(name: str) -> str:
        return re.sub(r"[-_ ]?\d+$", "", name)

    python = {t.native_id: group(t.name) for t in threading.enumerate()}
    ticks = os.sysconf("SC_CLK_TCK")
    groups: dict[str, float] = collections.defaultdict(float)
    for task in Path("/proc/self/task").iterdir():
        try:
            stat = (task / "stat").read_text()
            comm = (task / "comm").read_text().strip()
        except OSError:  # the thread ended meanwhile
            continue
        fields = stat.rsplit(")", 1)[1].split()
        seconds = (int(fields[11]) + int(fields[12])) / ticks
        tid = int(task.name)
        name = f"python: {python[tid]}" if tid in python else f"native: {group(comm)}"
        groups[name] += seconds
    return dict(groups)


def cpu_by_thread(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {
        name: after[name] - before.get(name, 0.0)
        for name in sorted(after)
        if after[name] > before.get(name, 0.0)
    }


def saturated_run(engine: Any, images: int, offset: int = 60_000) -> dict[str, Any]:
    """The engine in-process under saturation (2 x slots in flight, as bench/served_vs_recipe.py runs
    it): CPU per image by thread, and the programs it ran per image (from the trace)."""
    slots = DEVICES * SLOTS_PER_DEVICE
    runner = InProcess(engine)
    runner.run(slots, STEPS, SIZE, slots, offset=50_000)  # warm
    before, rows_before = len(engine.trace()), engine.stats().decode_rows_run
    threads = thread_cpu()
    began, cpu = time.perf_counter(), process_cpu_seconds()
    runner.run(images, STEPS, SIZE, 2 * slots, offset=offset)  # new prompts: the encodes run
    cpu, wall = process_cpu_seconds() - cpu, time.perf_counter() - began
    threads = cpu_by_thread(threads, thread_cpu())
    counts: collections.Counter[str] = collections.Counter()
    # Padded UNet row-steps (a device's rows below the dispatch's bucket), by whether the device had
    # no busy slot at all. Each guided image takes 2 rows; a slot's device is its block's (slot // per).
    per = 2 * SLOTS_PER_DEVICE
    images_on = [0] * DEVICES
    padded: collections.Counter[str] = collections.Counter()
    for event in engine.trace()[before:]:
        kind = str(event.kind)
        if kind == "admit":
            images_on[event.slot // per] += 1
        elif kind == "finish":
            images_on[event.slot // per] -= 1
        if kind == "step":
            k = int(event.detail.split()[0].removeprefix("k="))
            bucket = int(event.detail.rsplit(":", 1)[1])
            counts[f"ours step k={k} rows={bucket}"] += 1
            for n in images_on:
                padded["empty device" if n == 0 else "partly busy device"] += (bucket - 2 * n) * k
                padded["run"] += bucket * k
        elif kind in ("admit", "encode", "rearrange"):
            counts[kind] += 1
    counts["decode rows"] = int(engine.stats().decode_rows_run - rows_before)
    dispatches = [event.detail for event in engine.trace()[before:] if str(event.kind) == "step"]
    return {
        "images": images,
        "cpu_per_image": cpu / images,
        "wall_per_image": wall / images,
        "cpu_per_image_by_thread": {name: seconds / images for name, seconds in threads.items()},
        "per_image": {name: n / images for name, n in sorted(counts.items())},
        "padded_row_steps": dict(padded),
        # The round's first and last dispatches (busy slots and rows on both devices, bucket a device):
        # where its padding is.
        "edges": [*dispatches[:4], "...", *dispatches[-3:]],
    }


def recipe_run(recipe: Any, batches: int) -> dict[str, Any]:
    """The recipe's `generate` over whole batches, as bench/served_vs_recipe.py runs it: CPU per image
    by thread."""
    per_device = SLOTS_PER_DEVICE
    images = batches * per_device * DEVICES
    recipe.generate(["warm-up"] * per_device, "", 0, STEPS, GUIDANCE, SIZE[1], SIZE[0])
    threads = thread_cpu()
    began, cpu = time.perf_counter(), process_cpu_seconds()
    for b in range(batches):
        prompts = [prompt(b * per_device + i) for i in range(per_device)]
        recipe.generate(prompts, "", b, STEPS, GUIDANCE, SIZE[1], SIZE[0])
    cpu, wall = process_cpu_seconds() - cpu, time.perf_counter() - began
    threads = cpu_by_thread(threads, thread_cpu())
    return {
        "images": images,
        "cpu_per_image": cpu / images,
        "wall_per_image": wall / images,
        "cpu_per_image_by_thread": {name: seconds / images for name, seconds in threads.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=7, help="timed calls of each program")
    parser.add_argument("--rounds", type=int, default=3, help="recipe and engine runs, alternating")
    parser.add_argument("--images", type=int, default=40, help="images a side a round (as --batches 10)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    from sdxl_server.engine import JaxEngine

    from bench.bench_model import prepare_side_by_side
    from bench.seed_recipe import SeedRecipe

    prepare_side_by_side(DEVICES)
    load_before = os.getloadavg()
    say("starting the engine and the recipe")
    engine = JaxEngine(engine_config(DEVICES, SLOTS_PER_DEVICE, SIZE))
    engine.start()
    recipe = SeedRecipe(str(BENCH_MODEL_DIR), DEVICES)
    rounds = []
    for r in range(args.rounds):
        theirs_run = recipe_run(recipe, max(1, args.images // (DEVICES * SLOTS_PER_DEVICE)))
        ours_run = saturated_run(engine, args.images, offset=60_000 + 1_000 * r)
        rounds.append({"recipe": theirs_run, "engine": ours_run})
        say(
            f"round {r}: CPU s per image recipe {theirs_run['cpu_per_image']:.3f}, engine "
            f"{ours_run['cpu_per_image']:.3f}; "
            f"padded UNet row-steps {json.dumps(ours_run['padded_row_steps'])}; dispatches "
            f"{' | '.join(ours_run['edges'])}"
        )
    # Medians over the rounds; the programs per image are the rounds' means.
    run = {
        "cpu_per_image": statistics.median(x["engine"]["cpu_per_image"] for x in rounds),
        "per_image": {
            name: statistics.mean(x["engine"]["per_image"].get(name, 0.0) for x in rounds)
            for name in sorted({n for x in rounds for n in x["engine"]["per_image"]})
        },
        "cpu_per_image_by_thread": {
            name: statistics.median(x["engine"]["cpu_per_image_by_thread"].get(name, 0.0) for x in rounds)
            for name in sorted({n for x in rounds for n in x["engine"]["cpu_per_image_by_thread"]})
        },
    }
    recipe_side = {
        "cpu_per_image": statistics.median(x["recipe"]["cpu_per_image"] for x in rounds),
        "cpu_per_image_by_thread": {
            name: statistics.median(x["recipe"]["cpu_per_image_by_thread"].get(name, 0.0) for x in rounds)
            for name in sorted({n for x in rounds for n in x["recipe"]["cpu_per_image_by_thread"]})
        },
    }
    steps_run = (re.fullmatch(r"ours step k=(\d+) rows=(\d+)", name) for name in run["per_image"])
    used = {(int(m[1]), int(m[2])) for m in steps_run if m}
    ours, our_costs = engine_calls(engine, used)
    theirs, their_costs = recipe_calls(recipe)
    say("timing each program alone")
    times = timed({**ours, **theirs}, args.repeats)
    engine.stop()

    costs = {**our_costs, **their_costs}
    say("| program | GFLOP a device | GB accessed a device | wall ms | CPU ms |")
    say("| --- | ---: | ---: | ---: | ---: |")
    for name, t in times.items():
        c = costs.get(name)
        flops = f"{c['flops'] / 1e9:.2f}" if c else "-"
        nbytes = f"{c['bytes'] / 1e9:.3f}" if c else "-"
        say(f"| {name} | {flops} | {nbytes} | {t['wall'] * 1e3:.1f} | {t['cpu'] * 1e3:.1f} |")

    cpu = {name: t["cpu"] for name, t in times.items()}
    full = max(int(name.rsplit("rows=", 1)[1]) for name in ours if "rows=" in name)
    recipe8, recipe4 = cpu[f"recipe {STEPS} steps, latents out"], cpu["recipe 4 steps, latents out"]
    recipe_step = (recipe8 - recipe4) / 4
    recipe_batch = cpu[f"recipe batch ({STEPS} steps + VAE)"]
    batch = DEVICES * SLOTS_PER_DEVICE  # images in one of the recipe's calls
    decode_row = cpu["ours decode 1 a device"] / DEVICES  # one VAE row on one device
    # Our programs for one batch of 4 images at full batches: 8 / K steps of the full bucket, the VAE
    # once an image, an encode and an insert an image, a rearrange a boundary.
    ours_batch = (
        STEPS / K * cpu[f"ours step k={K} rows={full}"]
        + batch * decode_row
        + batch * (cpu["ours encode"] + cpu["ours insert"])
        + STEPS / K * cpu["ours rearrange"]
    )
    summary = {
        "ours_cpu_per_step_k4": cpu[f"ours step k={K} rows={full}"] / K,
        "ours_cpu_per_step_k1": cpu[f"ours step k=1 rows={full}"],
        "recipe_cpu_per_step": recipe_step,
        "ours_cpu_per_vae_row": decode_row,
        "recipe_cpu_per_vae_row": (recipe_batch - recipe8) / batch,
        "recipe_cpu_fixed_per_batch": recipe8 - STEPS * recipe_step,  # text encoders, noise, schedule
        "ours_programs_cpu_per_image_full_batches": ours_batch / batch,
        "recipe_program_cpu_per_image": recipe_batch / batch,
        "recipe_generate_cpu_per_image": cpu["recipe generate (tokenize, program, PIL)"] / batch,
    }
    price = {
        name.replace("ours ", ""): seconds for name, seconds in cpu.items() if name.startswith("ours step")
    }
    price.update(
        {"admit": cpu["ours insert"], "encode": cpu["ours encode"], "rearrange": cpu["ours rearrange"]}
    )
    price["decode rows"] = decode_row
    run["priced_cpu_per_image"] = {
        name: n * price[name.replace("ours ", "")] for name, n in run["per_image"].items()
    }
    run["priced_cpu_per_image_total"] = sum(run["priced_cpu_per_image"].values())
    for name, value in summary.items():
        say(f"{name}: {value * 1e3:.1f} ms")
    say(
        f"saturated runs (medians): engine {run['cpu_per_image']:.3f} CPU s per image, its programs "
        f"priced {run['priced_cpu_per_image_total']:.3f}; recipe generate {recipe_side['cpu_per_image']:.3f}"
    )
    for name, n in run["per_image"].items():
        say(f"    {name}: {n:.3f} per image, {run['priced_cpu_per_image'][name] * 1e3:.1f} CPU ms per image")
    for side, measured in (("engine", run), ("recipe", recipe_side)):
        say(f"{side} CPU ms per image by thread: " + ", ".join(
            f"{name} {seconds * 1e3:.1f}" for name, seconds in measured["cpu_per_image_by_thread"].items()
            if seconds * 1e3 >= 0.05
        ))  # fmt: skip
    load_now = os.getloadavg()
    report = {
        "command": "XLA_FLAGS=--xla_force_host_platform_device_count=2 .venv/bin/python bench/step_gap.py",
        "repeats": args.repeats,
        "costs": costs,
        "times": times,
        "summary": summary,
        "saturated_run": run,
        "recipe_run": recipe_side,
        "rounds": rounds,
        "load_average_before": load_before,
        "load_average_after": load_now,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    say(f"load average {load_before[0]:.2f} -> {load_now[0]:.2f}; wrote {args.out}")


if __name__ == "__main__":
    main()
