"""Per-request LoRA while serving (issue 23): what mixing adapters in one continuous batch costs, against
switching by merging as the peers do, and what a load does to requests whose adapter is resident.

One engine with `--lora-dir` (the bench-size SDXL of bench_model.py with its wider VAE, so that decoding
one image costs about one guided UNet step as real SDXL's does; 2 CPU devices x 2 slots, 128x128, K=4,
20 guided Euler steps), rank-16 kohya adapters on the UNet's LoRA targets, scale 0.8, a bank of 16
places, the server's default of 4 adapters per request (each request here names one, so the engine runs
the adapter step compiled for a stack of 1; the table's "widths" column says which it ran). Every
request is submitted at once (saturation), the same prompts and seeds in every configuration; each
configuration runs once per round, the rounds alternating them so that the shared machine's drift hits
all alike (ratios are medians of per-round ratios):

* none: no adapters (the plain step programs: what a server without adapters runs);
* 1, 4, 16: request i names adapter i mod n (all resident, loaded before the rounds): goal >= 0.9x
  none's images/s with 4. With 4 slots a batch holds at most 4 adapters: with 16, every batch holds 4
  different ones and the run 16;
* switch 4, switch 16: the same work as 4 and 16 by merging, which is what vLLM-Omni, SGLang and
  Tenstorrent's server do: requests grouped by adapter, one group at a time on the plain programs with
  the adapter merged into the UNet's weights (W + s * alpha/rank * down @ up, one jitted program on the
  device), the group drained before the next merge. Generous to the baseline: the factors are read from
  the files once, untimed; unmerging is free (the base weights are kept and put back); only the merges'
  device time and the drains count.

Then p99 latency of requests whose adapter is resident while other adapters load: a Poisson stream at
60% of the 4 adapters' capacity of requests naming 4 resident adapters, with every third arrival an
extra request naming either another resident adapter (quiet) or an adapter never used before (loading:
each is read, packed and written into the bank, evicting the least recently used idle one). The same
arrivals and requests in both; the resident requests' p50/p99 latency compared. The bench model's
adapters are small (a real SDXL adapter's first-use load: bench/lora_load.py).

Prints a table, writes bench/results/lora_serving.json and .png. Reaches into the engine twice, for the
peers' baseline only: the adapters' factors (the directory's parsed files) and the UNet's weights that
the step loop reads at every dispatch.

    .venv/bin/python bench/lora_serving.py [--images 16] [--rounds 2] [--stream 24]
        [--loras-per-request 4] [--out bench/results/lora_serving.json]
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")

import argparse
import json
import platform
import random
import statistics
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sdxl_server.engine import EngineConfig, JaxEngine
from sdxl_server.engine.api import Failed, Finished, GenerationRequest, LoraChoice, Resolution

from bench.bench_model import prepare_side_by_side
from bench.paths import COMPILE_CACHE, RESULTS_DIR
from bench.paths import HEAVY_VAE_BENCH_MODEL_DIR as BENCH_MODEL_DIR

RESULTS = RESULTS_DIR / "lora_serving.json"
RESOLUTION = Resolution(128, 128)
DEVICES = 2
SLOTS_PER_DEVICE = 2
GUIDANCE = 7.5
RANK = 16
SCALE = 0.8
PLACES = 16
MAX_STEPS = 20
WARM = 16  # adapters loaded before the rounds (w0..w15)
COLD = 12  # adapters first used while the loading stream runs (c0..c11)


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def write_adapters(folder: Path) -> None:
    from sdxl_test_support.lora_writers import random_layers, write_kohya

    for prefix, count, seed in (("w", WARM, 100), ("c", COLD, 200)):
        for i in range(count):
            layers = random_layers(
                BENCH_MODEL_DIR, rank=RANK, alpha=RANK / 2, seed=seed + i, components=("unet",)
            )
            write_kohya(BENCH_MODEL_DIR, layers, folder / f"{prefix}{i}.safetensors")


def engine_config(folder: Path, steps: int, loras_per_request: int) -> EngineConfig:
    return EngineConfig(
        model=str(BENCH_MODEL_DIR),
        resolutions=(RESOLUTION,),
        slots_per_device=SLOTS_PER_DEVICE,
        max_devices=DEVICES,
        max_queue=1024,
        max_steps=MAX_STEPS,  # fixed: a shorter smoke run loads the same programs as the real one
        default_steps=steps,
        compilation_cache_dir=str(COMPILE_CACHE),
        busy_window_seconds=600.0,
        steps_per_dispatch=4,  # as the other saturation benches: a CPU dispatch's fixed cost shows at 128
        lora_dir=str(folder),
        lora_places=PLACES,
        lora_max_rank=RANK,
        max_loras_per_request=loras_per_request,
    )


def request(tag: str, i: int, steps: int, adapter: str | None) -> GenerationRequest:
    return GenerationRequest(
        request_id=f"lora-{tag}-{i}",
        prompt=f"a benchmark prompt number {i}",
        negative_prompt="",
        seed=i,
        num_images=1,
        steps=steps,
        guidance_scale=GUIDANCE,
        resolution=RESOLUTION,
        sampler="euler",
        timestep_spacing="leading",
        loras=(LoraChoice(adapter, SCALE),) if adapter else (),
    )


class Waiter:
    """Submits requests (at once, or at given offsets) and records each one's latency and queue wait."""

    def __init__(self, engine: JaxEngine) -> None:
        self.engine = engine
        self.lock = threading.Condition()
        self.done: dict[str, Finished] = {}
        self.submitted: dict[str, float] = {}
        self.finished: dict[str, float] = {}
        self.failures: list[Failed] = []

    def submit(self, req: GenerationRequest) -> None:
        def listener(event: object, rid: str = req.request_id) -> None:
            if isinstance(event, Finished | Failed):
                with self.lock:
                    self.finished[rid] = time.perf_counter()
                    if isinstance(event, Finished):
                        self.done[rid] = event
                    else:
                        self.failures.append(event)
                    self.lock.notify_all()

        self.submitted[req.request_id] = time.perf_counter()
        self.engine.submit(req, listener)

    def wait(self, count: int) -> None:
        with self.lock:
            self.lock.wait_for(lambda: len(self.finished) >= count)
        if self.failures:
            raise RuntimeError(f"{len(self.failures)} requests failed: {self.failures[:3]}")


def run_batch(engine: JaxEngine, requests: Sequence[GenerationRequest]) -> dict[str, float]:
    waiter = Waiter(engine)
    began = time.perf_counter()
    for req in requests:
        waiter.submit(req)
    waiter.wait(len(requests))
    wall = max(waiter.finished.values()) - began
    return {"images": len(requests), "wall_seconds": wall, "images_per_second": len(requests) / wall}


def adapter_widths(engine: JaxEngine, after_boundary: int) -> list[int]:
    """The stack widths of the adapter step programs the engine ran after `after_boundary` (the step
    trace's `adapters=RES:W`; none: only plain steps)."""
    details = [e.detail for e in engine.trace() if e.kind == "step" and e.boundary > after_boundary]
    return sorted(
        {int(f.rpartition(":")[2]) for d in details for f in d.split() if f.startswith("adapters=")}
    )


class Merger:
    """The peers' switch: an adapter merged into the UNet's weights on the device (one jitted program for
    every adapter: same layers and rank), the base kept to put back (an unmerge at no cost)."""

    def __init__(self, engine: JaxEngine) -> None:
        import jax

        self.engine = engine
        self.params = engine._programs.params  # the step loop reads params["unet"] at every dispatch
        self.base = self.params["unet"]
        shardings = jax.tree_util.tree_map(lambda x: x.sharding, self.base)
        self._merge = jax.jit(_merged, out_shardings=shardings)
        self._factors: dict[str, Any] = {}

    def factors(self, name: str) -> Any:
        """The adapter's factors on the device, read once (untimed: generous to the baseline)."""
        import jax
        import jax.numpy as jnp

        if name not in self._factors:
            entry = self.engine._adapters.find(name)
            assert entry is not None and entry.file is not None, name
            layers = entry.file.load()
            factors = {
                "/".join(layer.kernel): (layer.down, layer.up * np.float32(layer.alpha / layer.rank))
                for layer in layers
            }
            self._factors[name] = jax.device_put(jax.tree_util.tree_map(jnp.asarray, factors))
        return self._factors[name]

    def merge(self, name: str) -> float:
        import jax

        factors = self.factors(name)
        began = time.perf_counter()
        merged = self._merge(self.base, factors, np.float32(SCALE))
        jax.block_until_ready(merged)
        self.params["unet"] = merged
        return time.perf_counter() - began

    def restore(self) -> None:
        self.params["unet"] = self.base


def _merged(base: Any, factors: Any, scale: Any) -> Any:
    from flax.traverse_util import flatten_dict, unflatten_dict

    flat = flatten_dict(base)
    for joined, (down, up) in factors.items():
        path = tuple(joined.split("/"))
        flat[path] = flat[path] + (scale * (down @ up)).astype(flat[path].dtype)
    return unflatten_dict(flat)


def switching(engine: JaxEngine, merger: Merger, work: Sequence[tuple[int, str]], steps: int) -> dict:
    """`work` (request index, adapter) grouped by adapter, each group on merged weights, drained."""
    groups: dict[str, list[int]] = {}
    for i, adapter in work:
        groups.setdefault(adapter, []).append(i)
    merge_seconds = 0.0
    began = time.perf_counter()
    try:
        for adapter, indices in groups.items():
            merge_seconds += merger.merge(adapter)
            run_batch(engine, [request(f"switch-{adapter}", i, steps, None) for i in indices])
    finally:
        merger.restore()
    wall = time.perf_counter() - began
    return {
        "images": len(work),
        "wall_seconds": wall,
        "images_per_second": len(work) / wall,
        "merges": len(groups),
        "merge_seconds": merge_seconds,
    }


def stream(engine: JaxEngine, count: int, rate: float, loading: bool, steps: int, seed: int) -> dict:
    """`count` resident-adapter requests at Poisson `rate`, every third arrival followed by an extra one
    naming a resident (quiet) or a never-used (loading) adapter; latencies of the resident ones."""
    rng = random.Random(seed)
    schedule: list[tuple[float, GenerationRequest, bool]] = []
    at, extra = 0.0, 0
    tag = "loading" if loading else "quiet"
    for i in range(count):
        at += rng.expovariate(rate)
        schedule.append((at, request(f"{tag}-r", 1000 + i, steps, f"w{i % 4}"), True))
        if i % 3 == 2:
            name = f"c{extra}" if loading else f"w{4 + extra % (WARM - 4)}"
            schedule.append((at, request(f"{tag}-x", 2000 + extra, steps, name), False))
            extra += 1
    waiter = Waiter(engine)
    before = engine.stats()
    began = time.perf_counter()
    for offset, req, _ in schedule:
        delay = began + offset - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        waiter.submit(req)
    waiter.wait(len(schedule))
    resident = [req.request_id for _, req, is_resident in schedule if is_resident]
    latencies = sorted(waiter.finished[r] - waiter.submitted[r] for r in resident)
    queues = sorted(waiter.done[r].queue_seconds for r in resident)
    after = engine.stats()
    return {
        "resident_requests": len(resident),
        "extra_requests": extra,
        "rate_per_second": rate,
        "p50_seconds": float(np.percentile(latencies, 50)),
        "p99_seconds": float(np.percentile(latencies, 99)),
        "max_seconds": latencies[-1],
        "queue_p99_seconds": float(np.percentile(queues, 99)),
        "loads": after.lora_loads - before.lora_loads,
        "load_seconds": after.lora_load_seconds - before.lora_load_seconds,
        "evictions": after.lora_evictions - before.lora_evictions,
    }


def plot(table: dict[str, dict], goal_ratio: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(table)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    colours = [
        "tab:gray" if n == "none" else "tab:red" if n.startswith("switch") else "tab:blue" for n in names
    ]
    ax.bar(names, [table[n]["images_per_second"] for n in names], color=colours)
    none = table["none"]["images_per_second"]
    ax.axhline(none * goal_ratio, color="k", linestyle="--", linewidth=1, label=f"{goal_ratio:g} x none")
    ax.set_ylabel("images/s at saturation")
    ax.set_xlabel("adapters among the requests (blue: mixed in one batch; red: merge-switching)")
    ax.set_title(
        f"rank-{RANK} LoRA, {DEVICES} CPU devices x {SLOTS_PER_DEVICE} slots, {RESOLUTION}, bench model"
    )
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=16, help="requests per configuration and round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds (ratios are medians over them)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps per request")
    parser.add_argument("--stream", type=int, default=24, help="resident requests per latency phase")
    parser.add_argument("--loras-per-request", type=int, default=4, help="the engine's stack width [4]")
    parser.add_argument("--out", type=Path, default=RESULTS, help="the JSON (and the PNG beside it)")
    args = parser.parse_args()

    prepare_side_by_side(DEVICES)
    load_average = [os.getloadavg()]
    with tempfile.TemporaryDirectory(prefix="lora-serving-") as tmp:
        folder = Path(tmp)
        write_adapters(folder)
        say("starting the engine (compiles the plain and the adapter bank's step programs on a cold cache)")
        engine = JaxEngine(engine_config(folder, args.steps, args.loras_per_request))
        engine.start()
        try:
            result = measure(engine, args)
        finally:
            engine.stop()
    load_average.append(os.getloadavg())
    result["load_average_start_end"] = load_average
    write(result, args.out)


def measure(engine: JaxEngine, args: argparse.Namespace) -> dict:
    n, steps = args.images, args.steps
    # Every warm adapter resident before the rounds, every program's first dispatch done.
    run_batch(engine, [request("warm", i, 2, f"w{i}") for i in range(WARM)])
    run_batch(engine, [request("warm-plain", i, 2, None) for i in range(DEVICES * SLOTS_PER_DEVICE)])
    merger = Merger(engine)
    for i in range(WARM):
        merger.factors(f"w{i}")
    merger.merge("w0")  # the merge program's compile, untimed
    merger.restore()

    def mixed(count: int) -> list[GenerationRequest]:
        return [request(f"mix{count}", i, steps, f"w{i % count}") for i in range(n)]

    configurations: dict[str, Any] = {
        "none": lambda: run_batch(engine, [request("none", i, steps, None) for i in range(n)]),
        "1": lambda: run_batch(engine, mixed(1)),
        "4": lambda: run_batch(engine, mixed(4)),
        "16": lambda: run_batch(engine, mixed(16)),
        "switch 4": lambda: switching(engine, merger, [(i, f"w{i % 4}") for i in range(n)], steps),
        "switch 16": lambda: switching(engine, merger, [(i, f"w{i % 16}") for i in range(n)], steps),
    }
    rounds: list[dict] = []
    for r in range(args.rounds):
        names = list(configurations) if r % 2 == 0 else list(reversed(configurations))
        round_ = {}
        for name in names:
            after = max((e.boundary for e in engine.trace()), default=-1)
            round_[name] = configurations[name]()
            round_[name]["load_average"] = os.getloadavg()[0]
            round_[name]["adapter_widths"] = adapter_widths(engine, after)
            say(
                f"round {r} {name}: {round_[name]['images_per_second']:.3f} images/s "
                f"(load {os.getloadavg()[0]:.1f})"
            )
        rounds.append(round_)

    def median_ratio(name: str, over: str = "none") -> float:
        return statistics.median(x[name]["images_per_second"] / x[over]["images_per_second"] for x in rounds)

    table = {
        name: {
            "images_per_second": statistics.median(x[name]["images_per_second"] for x in rounds),
            "over_none": median_ratio(name),
            "adapter_widths": sorted({w for x in rounds for w in x[name]["adapter_widths"]}),
        }
        for name in configurations
    }
    for count in ("4", "16"):
        table[count]["over_switching"] = median_ratio(count, f"switch {count}")
    capacity = table["4"]["images_per_second"]  # every request of the stream carries an adapter
    say(f"latency phases: Poisson at {0.6 * capacity:.3f}/s, quiet then loading")
    quiet = stream(engine, args.stream, 0.6 * capacity, False, steps, seed=7)
    say(f"quiet: p50 {quiet['p50_seconds']:.2f} s, p99 {quiet['p99_seconds']:.2f} s")
    loading = stream(engine, args.stream, 0.6 * capacity, True, steps, seed=7)
    say(
        f"loading: p50 {loading['p50_seconds']:.2f} s, p99 {loading['p99_seconds']:.2f} s, "
        f"{loading['loads']:.0f} loads, {loading['evictions']:.0f} evictions"
    )
    return {
        "host": platform.node(),
        "machine": platform.processor() or platform.machine(),
        "devices": DEVICES,
        "slots_per_device": SLOTS_PER_DEVICE,
        "resolution": str(RESOLUTION),
        "steps": steps,
        "rank": RANK,
        "places": PLACES,
        "loras_per_request": args.loras_per_request,
        "images_per_configuration": n,
        "rounds": rounds,
        "table": table,
        "latency": {"quiet": quiet, "loading": loading},
        "goals": {
            "4_adapters_over_none": {"value": table["4"]["over_none"], "goal": ">= 0.9"},
            "resident_p99_loading_over_quiet": {
                "value": loading["p99_seconds"] / quiet["p99_seconds"],
                "goal": "about 1 (a resident adapter's request never waits on a load)",
            },
        },
    }


def write(result: dict, out: Path) -> None:
    table = result["table"]
    print()
    print(f"{'adapters':<10} {'images/s':>9} {'x none':>7} {'x switching':>12} {'widths':>7}")
    for name, row in table.items():
        switch = f"{row['over_switching']:12.2f}" if "over_switching" in row else " " * 12
        widths = ",".join(map(str, row["adapter_widths"])) or "-"
        print(f"{name:<10} {row['images_per_second']:9.3f} {row['over_none']:7.2f} {switch} {widths:>7}")
    print()
    for phase, figures in result["latency"].items():
        print(
            f"{phase:<8} resident p50 {figures['p50_seconds']:6.2f} s  p99 {figures['p99_seconds']:6.2f} s  "
            f"queue p99 {figures['queue_p99_seconds']:5.2f} s  loads {figures['loads']:.0f}"
        )
    for name, goal in result["goals"].items():
        print(f"{name:<36} {goal['value']:.3f}   goal {goal['goal']}")
    print(f"load average at start and end: {result['load_average_start_end']}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(table, 0.9, out.with_suffix(".png"))
    say(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
