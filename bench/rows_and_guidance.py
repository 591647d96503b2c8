"""Rows, not slots: what guidance per request and few-step requests cost, in one run (issue 22).

One engine (the bench-size SDXL of bench_model.py with its wider VAE, so that decoding one image costs
about one guided UNet step of one image as real SDXL's does; 2 CPU devices x 2 slots, 128x128, K=4), the
same prompts and seeds, every request submitted at once (saturation). Configurations, each run in every
round, in turn, odd rounds in reverse order, so that the shared machine's drift hits all alike (ratios
are medians of the per-round ratios):

* guided: 20 Euler steps at guidance 7.5 (two UNet rows per step);
* unguided: the same at guidance 0 (one row) — goal >= 1.8x guided's images/s;
* interval: guidance 7.5 only for the first 40 % of the steps (`guidance_interval` (0, 0.4)) — goal
  <= 0.75x full guidance's device seconds;
* few-step: 4 unguided steps with the few-step sampler (`lcm` when the engine serves it, else Euler);
* mix: half few-step and half guided, interleaved in one continuous batch — goal >= 0.95x what the rows
  predict, the prediction being each kind's own saturated cost (N/2 images at the few-step rate plus N/2
  at the guided rate); a sample of its Euler images is checked against the Flax pipeline (jit=False,
  batch 1: the engine's oracle, at guidance 1.0 for the unguided ones) within one level.

Beside them, the recipe (seed_recipe.py: `FlaxStableDiffusionXLPipeline(jit=True)`), which compiles one
scheduler and one guidance setting per program, run once per configuration on the same total work: it
always computes both rows (at guidance 0 it mixes them to the unconditional prediction), and the mix is
two separate runs, one per setting.

Each run also records the steps its dispatches ran and their row-steps per device (from the engine's
trace: what the batching policy decided, which the machine's load cannot change), this process's CPU
seconds, and the load average. The CPU seconds are not the work: measured on the shared 2-vCPU VM,
80 guided steps took 18.5 CPU s and 40 unguided ones 12.6 (docs/PERFORMANCE.md), so they are recorded,
not compared against the goals.

Prints a table, writes bench/results/rows_and_guidance.json and .png.

    .venv/bin/python bench/rows_and_guidance.py [--images 24] [--rounds 2] [--size 128x128]
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")

import argparse
import dataclasses
import io
import json
import platform
import statistics
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
from sdxl_server.engine import EngineConfig, JaxEngine  # noqa: E402
from sdxl_server.engine.api import Failed, Finished, GenerationRequest, ImageReady, Resolution  # noqa: E402
from sdxl_server.service.request_conversion import default_spacing  # noqa: E402

from bench.bench_model import prepare_side_by_side  # noqa: E402
from bench.paths import COMPILE_CACHE  # noqa: E402
from bench.paths import HEAVY_VAE_BENCH_MODEL_DIR as BENCH_MODEL_DIR  # noqa: E402
from bench.seed_recipe import SeedRecipe  # noqa: E402

RESULTS = REPO / "bench" / "results" / "rows_and_guidance.json"
DEFAULT_RESOLUTION = Resolution(128, 128)
RESOLUTION = DEFAULT_RESOLUTION  # --size sets it once, at the start of main
DEVICES = 2
SLOTS_PER_DEVICE = 2
STEPS = 20
FEW_STEPS = 4
GUIDANCE = 7.5


@dataclasses.dataclass(frozen=True)
class Kind:
    """One kind of request: steps, guidance, interval and sampler."""

    name: str
    steps: int
    guidance: float
    interval: tuple[float, float] = (0.0, 1.0)
    sampler: str = "euler"
    spacing: str = "leading"  # "" for a sampler with a schedule of its own (LCM)


def engine_config() -> EngineConfig:
    return EngineConfig(
        model=str(BENCH_MODEL_DIR),
        resolutions=(RESOLUTION,),
        slots_per_device=SLOTS_PER_DEVICE,
        max_devices=DEVICES,
        max_queue=1024,
        max_steps=STEPS,
        default_steps=STEPS,
        compilation_cache_dir=str(COMPILE_CACHE),
        busy_window_seconds=600.0,
        steps_per_dispatch=4,  # as engine_vs_recipe.py: a CPU dispatch's fixed cost is visible at 128x128
    )


def load_average() -> str:
    """The 1-, 5- and 15-minute load averages: the other processes this run shared the cores with."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def run_batch(engine: JaxEngine, kinds: list[Kind], keep_images: bool = False) -> dict:
    """Submits one request per kind at once (request i: seed i, its own prompt) and waits for all."""
    lock = threading.Condition()
    finished: list[float] = []
    failures: list[Failed] = []
    images: dict[int, bytes] = {}
    busy_before = engine.device_busy_seconds()
    trace_before = engine.trace()[-1:]
    cpu_before = time.process_time()
    began = time.perf_counter()
    for i, kind in enumerate(kinds):

        def listener(event: object, i: int = i) -> None:
            if isinstance(event, ImageReady) and keep_images:
                images[i] = event.data
            if isinstance(event, Finished | Failed):
                with lock:
                    finished.append(time.perf_counter())
                    if isinstance(event, Failed):
                        failures.append(event)
                    lock.notify_all()

        engine.submit(request(i, kind), listener)
    with lock:
        lock.wait_for(lambda: len(finished) == len(kinds))
    if failures:
        raise RuntimeError(f"{len(failures)} requests failed: {failures[:3]}")
    wall = max(finished) - began
    return {
        "images": len(kinds),
        "wall_seconds": wall,
        "images_per_second": len(kinds) / wall,
        "device_seconds": engine.device_busy_seconds() - busy_before,
        "cpu_seconds": time.process_time() - cpu_before,
        **dispatched(engine.trace(), trace_before),
        "pngs": images,
    }


def dispatched(trace: list, before: list) -> dict:
    """The steps the batch's dispatches ran and their row-steps per device (k x row bucket), from the
    engine's trace after the event `before` ended with (the trace holds the last 4,096 events)."""
    start = trace.index(before[0]) + 1 if before and before[0] in trace else 0
    steps = row_steps = 0
    for event in trace[start:]:
        if event.kind == "step":
            fields = dict(part.split("=", 1) for part in event.detail.split())
            k = int(fields["k"])
            steps += k
            row_steps += k * max(int(bank.rsplit(":", 1)[1]) for bank in fields["batch"].split(","))
    return {"steps": steps, "row_steps_per_device": row_steps}


def request(i: int, kind: Kind) -> GenerationRequest:
    return GenerationRequest(
        request_id=f"rows-{kind.name}-{i}",
        prompt=prompt(i),
        negative_prompt="",
        seed=i,
        num_images=1,
        steps=kind.steps,
        guidance_scale=kind.guidance,
        resolution=RESOLUTION,
        guidance_interval=kind.interval,
        sampler=kind.sampler,
        timestep_spacing=kind.spacing,
    )


def prompt(i: int) -> str:
    return f"a benchmark prompt number {i}"


def recipe_run(recipe: SeedRecipe, kinds: list[Kind]) -> dict:
    """The recipe on the same work: one batch per device per SLOTS_PER_DEVICE images, one run per
    setting (a fused program per scheduler and guidance setting), same steps."""
    by_setting: dict[tuple[int, float], int] = {}
    for kind in kinds:
        key = (kind.steps, kind.guidance)
        by_setting[key] = by_setting.get(key, 0) + 1
    per_call = SLOTS_PER_DEVICE * DEVICES
    cpu_before = time.process_time()
    began = time.perf_counter()
    for (steps, guidance), count in by_setting.items():
        for b in range(-(-count // per_call)):
            prompts = [prompt(b * per_call + j) for j in range(SLOTS_PER_DEVICE)]
            recipe.generate(prompts, "", b, steps, guidance, RESOLUTION.height, RESOLUTION.width)
    wall = time.perf_counter() - began
    return {
        "images": len(kinds),
        "wall_seconds": wall,
        "images_per_second": len(kinds) / wall,
        "cpu_seconds": time.process_time() - cpu_before,
    }


def warm_recipe(recipe: SeedRecipe, kinds: list[Kind]) -> None:
    for steps, guidance in {(k.steps, k.guidance) for k in kinds}:
        recipe.generate(
            ["warm-up"] * SLOTS_PER_DEVICE, "", 0, steps, guidance, RESOLUTION.height, RESOLUTION.width
        )


def oracle_check(mix: dict, kinds: list[Kind], sample: int) -> list[dict]:
    """The first `sample` Euler images of each guidance in the mix against the Flax pipeline."""
    import jax
    from diffusers import FlaxStableDiffusionXLPipeline
    from PIL import Image

    pipeline, params = FlaxStableDiffusionXLPipeline.from_pretrained(str(BENCH_MODEL_DIR))
    checked: list[dict] = []
    counts: dict[str, int] = {}
    for i, kind in enumerate(kinds):
        if kind.sampler != "euler" or kind.interval != (0.0, 1.0) or counts.get(kind.name, 0) >= sample:
            continue
        counts[kind.name] = counts.get(kind.name, 0) + 1
        expected = pipeline(
            pipeline.prepare_inputs([prompt(i)]),
            params,
            jax.random.PRNGKey(i),
            num_inference_steps=kind.steps,
            guidance_scale=max(kind.guidance, 1.0),  # unguided: the pipeline at 1.0, both rows mixed to one
            height=RESOLUTION.height,
            width=RESOLUTION.width,
            jit=False,
        ).images
        expected = np.round(np.asarray(expected[0]) * 255).astype(np.int32)
        got = np.asarray(Image.open(io.BytesIO(mix["pngs"][i])).convert("RGB")).astype(np.int32)
        difference = int(np.abs(got - expected).max())
        checked.append({"request": i, "kind": kind.name, "max_level_difference": difference})
        say(f"oracle: request {i} ({kind.name}) differs by at most {difference} level(s)")
    return checked


def plot(table: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(table)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    x = np.arange(len(names))
    ax.bar(x - 0.2, [table[n]["engine_images_per_second"] for n in names], 0.4, label="engine (rows)")
    ax.bar(x + 0.2, [table[n]["recipe_images_per_second"] for n in names], 0.4, label="recipe (jit=True)")
    ax.set_xticks(x, names)
    ax.set_ylabel("images/s at saturation")
    ax.set_title(f"{DEVICES} CPU devices x {SLOTS_PER_DEVICE} slots, {RESOLUTION}, bench model")
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=24, help="requests per configuration and round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds (ratios are medians over them)")
    parser.add_argument("--oracle-sample", type=int, default=2, help="mix images per kind checked")
    parser.add_argument(
        "--size",
        default=str(DEFAULT_RESOLUTION),
        help="WIDTHxHEIGHT (default %(default)s); at a larger size a step costs nearer its rows' share",
    )
    args = parser.parse_args()
    global RESOLUTION, RESULTS  # set once, here, before anything reads them
    RESOLUTION = Resolution.parse(args.size)
    if RESOLUTION != DEFAULT_RESOLUTION:  # keep the default size's results beside another size's
        RESULTS = RESULTS.with_name(f"rows_and_guidance-{RESOLUTION}.json")

    prepare_side_by_side(DEVICES)
    say("starting the engine (compiles every row bucket's step program on a cold cache)")
    engine = JaxEngine(engine_config())
    engine.start()
    limits = engine.limits()
    few_sampler = "lcm" if "lcm" in limits.samplers else "euler"
    few_spacing = default_spacing(few_sampler, limits)
    n = args.images
    kinds = {
        "guided": [Kind("guided", STEPS, GUIDANCE)] * n,
        "unguided": [Kind("unguided", STEPS, 0.0)] * n,
        "interval": [Kind("interval", STEPS, GUIDANCE, (0.0, 0.4))] * n,
        "few-step": [Kind("few-step", FEW_STEPS, 0.0, sampler=few_sampler, spacing=few_spacing)] * n,
        "mix": [
            Kind("few-step", FEW_STEPS, 0.0, sampler=few_sampler, spacing=few_spacing)
            if i % 2 == 0
            else Kind("guided", STEPS, GUIDANCE)
            for i in range(n)
        ],
    }
    say(f"engine ready; the recipe compiles one program per setting (few-step sampler: {few_sampler})")
    recipe = SeedRecipe(str(BENCH_MODEL_DIR), DEVICES)
    warm_recipe(recipe, [k for ks in kinds.values() for k in ks])
    run_batch(engine, kinds["mix"][: DEVICES * SLOTS_PER_DEVICE])  # the engine's first boundaries, untimed

    rounds: list[dict] = []
    last_mix: dict = {}
    for r in range(args.rounds):
        round_: dict = {}
        # Odd rounds run the configurations in reverse: a load that rises or falls through a round
        # would otherwise favour the configurations that always run last.
        for name, work in list(kinds.items())[:: 1 if r % 2 == 0 else -1]:
            ours = run_batch(engine, work, keep_images=name == "mix" and r == args.rounds - 1)
            if name == "mix":
                last_mix = ours
            theirs = recipe_run(recipe, work)
            round_[name] = {"engine": {k: v for k, v in ours.items() if k != "pngs"}, "recipe": theirs}
            say(
                f"round {r} {name}: engine {ours['images_per_second']:.3f}/s "
                f"({ours['device_seconds']:.2f} device s, {ours['cpu_seconds']:.2f} CPU s, "
                f"{ours['steps']} steps), recipe {theirs['images_per_second']:.3f}/s "
                f"({theirs['cpu_seconds']:.2f} CPU s); load {load_average()}"
            )
        rounds.append(round_)
    engine_stats = engine.loop_statistics()
    engine.stop()

    def ips(round_: dict, name: str, side: str = "engine") -> float:
        return round_[name][side]["images_per_second"]

    def median(values: list[float]) -> float:
        return statistics.median(values)

    unguided_over_guided = median([ips(x, "unguided") / ips(x, "guided") for x in rounds])
    interval_over_full = median(
        [x["interval"]["engine"]["device_seconds"] / x["guided"]["engine"]["device_seconds"] for x in rounds]
    )

    def predicted(x: dict) -> float:  # each half at its own kind's saturated rate
        return n / ((n / 2) / ips(x, "few-step") + (n / 2) / ips(x, "guided"))

    mix_over_prediction = median([ips(x, "mix") / predicted(x) for x in rounds])

    def cpu(x: dict, name: str) -> float:
        return x[name]["engine"]["cpu_seconds"]

    oracle = oracle_check(last_mix, kinds["mix"], args.oracle_sample)
    table = {
        name: {
            "engine_images_per_second": median([ips(x, name) for x in rounds]),
            "recipe_images_per_second": median([ips(x, name, "recipe") for x in rounds]),
            "engine_device_seconds": median([x[name]["engine"]["device_seconds"] for x in rounds]),
            "engine_cpu_seconds": median([cpu(x, name) for x in rounds]),
            "steps": median([x[name]["engine"]["steps"] for x in rounds]),
            "engine_over_recipe": median([ips(x, name) / ips(x, name, "recipe") for x in rounds]),
        }
        for name in kinds
    }
    goals = {
        "unguided_over_guided_images_per_second": {"value": unguided_over_guided, "goal": ">= 1.8"},
        "interval_0.4_over_full_guidance_device_seconds": {"value": interval_over_full, "goal": "<= 0.75"},
        "mix_over_row_prediction": {"value": mix_over_prediction, "goal": ">= 0.95"},
        "mix_oracle_max_level_difference": {
            "value": max((c["max_level_difference"] for c in oracle), default=None),
            "goal": "<= 1",
        },
    }
    print()
    print(
        f"{'configuration':<12} {'engine img/s':>13} {'recipe img/s':>13} "
        f"{'engine/recipe':>14} {'device s':>9} {'CPU s':>7} {'steps':>6}"
    )
    for name, row in table.items():
        print(
            f"{name:<12} {row['engine_images_per_second']:>13.3f} {row['recipe_images_per_second']:>13.3f} "
            f"{row['engine_over_recipe']:>14.2f} {row['engine_device_seconds']:>9.2f} "
            f"{row['engine_cpu_seconds']:>7.2f} {row['steps']:>6g}"
        )
    print()
    for name, goal in goals.items():
        value = goal["value"]
        shown = "n/a" if value is None else f"{value:.3f}"
        print(f"{name:<48} {shown:>8}   goal {goal['goal']}")
    result = {
        "host": platform.node(),
        "machine": platform.processor() or platform.machine(),
        "devices": DEVICES,
        "slots_per_device": SLOTS_PER_DEVICE,
        "resolution": str(RESOLUTION),
        "steps": STEPS,
        "few_steps": FEW_STEPS,
        "few_step_sampler": few_sampler,
        "images_per_configuration": n,
        "load_average_at_end": load_average(),
        "rounds": rounds,
        "table": table,
        "goals": goals,
        "oracle": oracle,
        "row_buckets": {str(k): v for k, v in engine_stats.row_buckets.items()},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    plot(table, RESULTS.with_suffix(".png"))
    say(f"wrote {RESULTS} and {RESULTS.with_suffix('.png')}")


if __name__ == "__main__":
    main()
