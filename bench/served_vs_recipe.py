"""The served path against the engine in-process and the seed's recipe, in one run: what callers get.

Same model (the bench-size SDXL of bench_model.py with its expensive VAE), same CPU devices, batch, size
and steps on every side; the gRPC server is a real `sdxl-server serve` process and its client runs in a
separate process (this file with --client), so that the client's CPU is not the server's. Measured:

* saturation at 8 and 20 steps (256x256, 2 devices x 2 slots; the recipe's batch is 2 per device): the
  recipe's images/s over whole batches, the in-process engine's and the served images/s with 2 x slots
  requests kept in flight, between the slots-th and the last-slots-th finished image (the ramp-up and the
  drain leave slots idle on any server); recipe, in-process and served alternate in rounds, and each ratio
  is the median of the rounds' ratios (the machine is shared and its load drifts); per round, how full
  the batches ran on each side (busy / run UNet row-steps, VAE rows per image: the engine's counters);
* a lone request (128x128, 8 steps, a server with 4 slots on 1 device) against the recipe at batch 1 on
  1 device: median latencies, client-observed, alternating blocks;
* Poisson arrivals at 70% of the served capacity (128x128, steps 4..14): p50/p99 of a continuous, a
  continuous with an engine per device (--engine-per-device, "apart"), a static and a static with an
  engine per device ("static-apart") server, all at one
  step per dispatch as the in-process Poisson runs (bench/engine_vs_recipe.py) and the server's default,
  and of a continuous and a static engine in-process on the same arrivals, taking turns in rounds; the
  capacity is the median of three saturated rounds of the continuous server;
* the prompt-embedding cache: a repeated prompt's Timings show no text encoding and its image is the
  same bytes; in-process, the trace shows no encode;
* the time budget (mean seconds per phase) of a lone and of a saturated request, served and in-process,
  and the client's CPU per call.

Prints tables, writes bench/results/served_vs_recipe.json. Goals (issue 21): saturated served >= 0.95x
the recipe at 8 and 20 steps; lone <= 1.1x; continuous p99 <= 0.6x static's at 70% load, served.

    .venv/bin/python bench/served_vs_recipe.py [--quick]
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")

import argparse
import asyncio
import contextlib
import hashlib
import json
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
from bench.paths import COMPILE_CACHE  # noqa: E402
from bench.paths import HEAVY_VAE_BENCH_MODEL_DIR as BENCH_MODEL_DIR  # noqa: E402

RESULTS = REPO / "bench" / "results" / "served_vs_recipe.json"
DEVICES = 2
SLOTS_PER_DEVICE = 2
SMALL_SIZE = (128, 128)
LONE_SLOTS = 4
GUIDANCE = 7.5
STEP_MIX = (4, 12, 6, 10, 8, 14, 5, 9, 7, 11, 13)
# The saturation and lone parts' --steps-per-dispatch (the Poisson part's is 1), set by the flag of that
# name: 4 as bench/engine_vs_recipe.py (a CPU dispatch's fixed cost is visible at 128x128).
STEPS_PER_DISPATCH = 4
PHASES = (
    "admission",
    "tokenize",
    "text_encode",
    "queue",
    "denoise",
    "decode",
    "to_host",
    "image_encode",
    "total",
)


# The served side's process, by target: its CPU time is read from /proc for the CPU per image.
SERVER_PIDS: dict[str, int] = {}
# The served side's /metrics page, by target: how full its batches ran (batch_counts).
SERVER_METRICS: dict[str, Any] = {}
BATCH_COUNTERS = {  # EngineStats field: its /metrics counter
    "unet_row_steps_run": "sdxl_unet_row_steps_total",
    "unet_row_steps_busy": "sdxl_unet_busy_row_steps_total",
    "decodes_total": "sdxl_decodes_total",
    "decode_rows_run": "sdxl_decode_rows_total",
    "images_total": "sdxl_images_total",
}


def process_cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU of a process, all its threads (XLA's pool included); None: this process."""
    if pid is None:
        return time.process_time()
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def batch_counts(side: Any) -> dict[str, float]:
    """How full the batches have run so far: a served target's /metrics, or an in-process engine's stats."""
    if isinstance(side, str):
        from sdxl_test_support.metrics_page import metric_samples, sample

        samples = metric_samples(SERVER_METRICS[side]())
        return {field: sample(samples, name) for field, name in BATCH_COUNTERS.items()}
    stats = side.stats()
    return {field: float(getattr(stats, field)) for field in BATCH_COUNTERS}


def batch_fullness(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Between two batch_counts: busy rows' share of the UNet row-steps run, VAE rows run per image."""
    moved = {field: after[field] - before[field] for field in BATCH_COUNTERS}
    return {
        "busy_over_run_row_steps": moved["unet_row_steps_busy"] / max(moved["unet_row_steps_run"], 1),
        "decode_rows_per_image": moved["decode_rows_run"] / max(moved["images_total"], 1),
        "decodes_per_image": moved["decodes_total"] / max(moved["images_total"], 1),
    }


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def steady_rate(finished_at: list[float], edge: int) -> float:
    """Images/s between the edge-th and the last-edge-th finish: every slot busy throughout."""
    ordered = sorted(finished_at)
    return (len(ordered) - 2 * edge) / (ordered[-edge - 1] - ordered[edge - 1])


def prompt(i: int) -> str:
    return f"a benchmark prompt number {i}"


# ---- the client process (this file with --client): grpc.aio, images kept as bytes, never decoded


async def _client(spec: dict[str, Any]) -> dict[str, Any]:
    import grpc.aio
    from sdxl_client._proto.sdxl.v1 import sdxl_pb2, sdxl_pb2_grpc

    width, height = spec["size"]
    steps_of = spec["steps"]
    results: list[dict[str, Any]] = []

    def message(i: int) -> Any:
        return sdxl_pb2.GenerateRequest(
            prompt=spec.get("prompt") or prompt(spec["offset"] + i), seed=spec["offset"] + i, num_images=1,
            steps=steps_of[i % len(steps_of)], guidance_scale=GUIDANCE, width=width, height=height,
        )  # fmt: skip

    async with grpc.aio.insecure_channel(spec["target"]) as channel:
        stub = sdxl_pb2_grpc.ImageServiceStub(channel)

        async def one(i: int) -> None:
            sent = time.perf_counter()
            response = await stub.Generate(message(i), timeout=900)
            now = time.perf_counter()
            t = response.timings
            results.append(
                {
                    "i": i,
                    "latency": now - sent,
                    "finished_at": now,
                    "phases": {p: getattr(t, f"{p}_seconds") for p in PHASES},
                    "sha256": hashlib.sha256(response.images[0].data).hexdigest(),
                    "bytes": len(response.images[0].data),
                }
            )

        cpu_before = resource.getrusage(resource.RUSAGE_SELF)
        began = time.perf_counter()
        count = spec["count"]
        if spec["mode"] == "closed":
            next_index = 0

            async def worker() -> None:
                nonlocal next_index
                while next_index < count:
                    i = next_index
                    next_index += 1
                    await one(i)

            await asyncio.gather(*(worker() for _ in range(spec["concurrency"])))
        else:  # open loop: Poisson arrivals at spec["rate"]
            rng = np.random.default_rng(spec["seed"])
            at, tasks = began, []
            for i, gap in enumerate(rng.exponential(1 / spec["rate"], count)):
                at += gap
                if (delay := at - time.perf_counter()) > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(i)))
            await asyncio.gather(*tasks)
        cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    return {"began": began, "results": sorted(results, key=lambda r: r["i"]), "client_cpu_seconds": cpu}


def client_run(target: str, **spec: Any) -> dict[str, Any]:
    """Runs one load in a separate client process and returns what it measured."""
    spec = {"target": target, "offset": 0, "seed": 0, "concurrency": 1, "mode": "closed", **spec}
    done = subprocess.run(
        [sys.executable, __file__, "--client", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
        timeout=3600,
        env={**os.environ, "XLA_FLAGS": ""},
    )
    if done.returncode != 0:
        raise RuntimeError(f"client failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- servers


@contextlib.contextmanager
def server(
    devices: int,
    slots_per_device: int,
    size: tuple[int, int],
    policy: str,
    steps_per_dispatch: int | None = None,
    engine_per_device: bool = False,
) -> Iterator[str]:
    from sdxl_test_support.servers import RunningServer

    args = [
        "--model", str(BENCH_MODEL_DIR), "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0",
        "--resolutions", f"{size[0]}x{size[1]}", "--slots-per-device", str(slots_per_device),
        "--max-queue", "1024", "--max-steps", "20", "--default-steps", "8", "--policy", policy,
        "--steps-per-dispatch", str(steps_per_dispatch or STEPS_PER_DISPATCH),
        "--compilation-cache-dir", str(COMPILE_CACHE),
    ] + (["--engine-per-device"] if engine_per_device else [])  # fmt: skip
    env = {"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    running = RunningServer(args, env=env)
    try:
        running.wait_ready(timeout=1800)
        SERVER_PIDS[running.target] = running.process.pid
        SERVER_METRICS[running.target] = running.scrape_metrics
        yield running.target
    finally:
        running.terminate(timeout=120)


def engine_config(
    devices: int,
    slots_per_device: int,
    size: tuple[int, int],
    policy: str = "continuous",
    steps_per_dispatch: int | None = None,
):
    from sdxl_server.engine import EngineConfig
    from sdxl_server.engine.api import Resolution

    return EngineConfig(
        model=str(BENCH_MODEL_DIR), resolutions=(Resolution(*size),), slots_per_device=slots_per_device,
        max_devices=devices, policy=policy, max_queue=1024, max_steps=20, default_steps=8,
        compilation_cache_dir=str(COMPILE_CACHE), busy_window_seconds=600.0,
        steps_per_dispatch=steps_per_dispatch or STEPS_PER_DISPATCH,
    )  # fmt: skip


# ---- the engine in this process


class InProcess:
    """Submits requests to a JaxEngine in this process and records each one's Finished."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def run(
        self, count: int, steps: int | list[int], size: tuple[int, int], concurrency: int, offset: int = 0
    ):
        """A closed loop: `concurrency` requests in flight until `count` have finished; request i asks for
        `steps`, or steps[i % len(steps)] of a list."""
        steps_of = steps if isinstance(steps, list) else [steps]
        lock = threading.Condition()
        results: list[dict[str, Any]] = []
        failures: list[Any] = []
        submitted = 0
        with lock:
            while len(results) + len(failures) < count:
                while submitted < count and submitted - len(results) - len(failures) < concurrency:
                    lock.release()
                    try:
                        steps_now = steps_of[submitted % len(steps_of)]
                        self._submit(offset + submitted, steps_now, size, lock, results, failures, submitted)
                    finally:
                        lock.acquire()
                    submitted += 1
                lock.wait()
        return self._outcome(results, failures)

    def open_loop(self, count: int, steps_of: list[int], size: tuple[int, int], rate: float, seed: int,
                  offset: int = 0) -> dict[str, Any]:  # fmt: skip
        """Poisson arrivals at `rate`, the client's (`_client`, mode "open"): the same seed gives the
        same gaps, and request i asks for steps_of[i % len(steps_of)] steps."""
        lock = threading.Condition()
        results: list[dict[str, Any]] = []
        failures: list[Any] = []
        began = at = time.perf_counter()
        for i, gap in enumerate(np.random.default_rng(seed).exponential(1 / rate, count)):
            at += gap
            if (delay := at - time.perf_counter()) > 0:
                time.sleep(delay)
            self._submit(offset + i, steps_of[i % len(steps_of)], size, lock, results, failures, i)
        with lock:
            while len(results) + len(failures) < count:
                lock.wait()
        return {"began": began, **self._outcome(results, failures)}

    def _submit(self, number: int, steps: int, size: tuple[int, int], lock: threading.Condition,
                results: list[dict[str, Any]], failures: list[Any], i: int) -> None:  # fmt: skip
        from sdxl_server.engine.api import Failed, Finished, GenerationRequest, Resolution

        sent = time.perf_counter()

        def listener(event: object) -> None:
            if isinstance(event, Finished | Failed):
                with lock:
                    now = time.perf_counter()
                    if isinstance(event, Failed):
                        failures.append(event)
                    else:
                        phases = {p: getattr(event, f"{p}_seconds") for p in PHASES if p != "admission"}
                        results.append({"i": i, "latency": now - sent, "finished_at": now, "phases": phases})
                    lock.notify_all()

        request = GenerationRequest(
            request_id=f"in-process-{number}", prompt=prompt(number), negative_prompt="", seed=number,
            num_images=1, steps=steps, guidance_scale=GUIDANCE, resolution=Resolution(*size),
        )  # fmt: skip
        self.engine.submit(request, listener)

    @staticmethod
    def _outcome(results: list[dict[str, Any]], failures: list[Any]) -> dict[str, Any]:
        if failures:
            raise RuntimeError(f"in-process requests failed: {failures[:3]}")
        return {"results": sorted(results, key=lambda r: r["i"])}


def recipe_rate(recipe: Any, batches: int, steps: int, size: tuple[int, int]) -> tuple[float, float]:
    """The recipe's images/s over whole batches, and its CPU seconds per image (this process's)."""
    per_device = SLOTS_PER_DEVICE
    recipe.generate(["warm-up"] * per_device, "", 0, steps, GUIDANCE, size[1], size[0])
    began, cpu = time.perf_counter(), process_cpu_seconds()
    for b in range(batches):
        prompts = [prompt(b * per_device + i) for i in range(per_device)]
        recipe.generate(prompts, "", b, steps, GUIDANCE, size[1], size[0])
    images = batches * per_device * len(recipe.devices)
    return images / (time.perf_counter() - began), (process_cpu_seconds() - cpu) / images


def mean_phases(results: list[dict[str, Any]]) -> dict[str, float]:
    keys = results[0]["phases"].keys()
    return {k: float(statistics.mean(r["phases"][k] for r in results)) for k in keys}


# ---- the run


def main() -> None:
    global STEPS_PER_DISPATCH  # set from the flag; server() and engine_config() read it when called
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--client", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="fewer requests and rounds (a smoke run)")
    parser.add_argument("--rounds", type=int, default=None, help="saturation rounds (default 2; 1 quick)")
    parser.add_argument(
        "--parts",
        default="saturation,lone,poisson",
        help="which parts to run (saturation, lone, poisson); the JSON is written after each",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the JSON goes")
    parser.add_argument(
        "--steps-per-dispatch",
        type=int,
        default=STEPS_PER_DISPATCH,
        help=f"the engine's --steps-per-dispatch in the saturation and lone parts ({STEPS_PER_DISPATCH})",
    )
    parser.add_argument(
        "--batches",
        type=int,
        default=None,
        help="saturation images a side a round, in the recipe's calls of 4 images (2 devices x 2; default 5, "
        "3 quick): the rates count all but the first and the last 4 images, 12 of 20 at 5",
    )
    parser.add_argument("--saturation-size", default="256x256", help="WxH of the saturation part")
    parser.add_argument("--saturation-steps", default="8,20", help="step counts of the saturation part")
    parser.add_argument(
        "--poisson-requests",
        type=int,
        default=None,
        help="requests per policy in the Poisson part (default 120; 30 quick): at 100 or more the p99 is "
        "not the slowest request",
    )
    parser.add_argument(
        "--poisson-rounds",
        type=int,
        default=2,
        help="rounds the Poisson part's requests are split into, the sides taking turns (load drift)",
    )
    parser.add_argument(
        "--poisson-served-only",
        action="store_true",
        help="the Poisson part without its in-process engines beside the servers (half the time)",
    )
    parser.add_argument(
        "--poisson-layout",
        default=f"{DEVICES}x{SLOTS_PER_DEVICE}",
        help="DEVICESxSLOTS of the Poisson part's servers (default %(default)s): 1x4 asks what the same "
        "slots give on one device, which is what two CPU devices sharing this host's cores are to a queue",
    )
    args = parser.parse_args()
    if args.client:
        print(json.dumps(asyncio.run(_client(json.loads(args.client)))))
        return

    import jax

    from bench.bench_model import prepare_side_by_side

    prepare_side_by_side(DEVICES)
    STEPS_PER_DISPATCH = args.steps_per_dispatch
    rounds = args.rounds or (1 if args.quick else 2)
    batches = args.batches or (3 if args.quick else 5)
    load_before = os.getloadavg()
    result: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {DEVICES} x {jax.devices()[0].device_kind}",
        "load_average_before": load_before,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "steps_per_dispatch": STEPS_PER_DISPATCH,
    }

    parts = set(args.parts.split(","))

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({**result, "load_average_now": os.getloadavg()}, indent=2) + "\n")

    if "saturation" in parts:
        size = tuple(int(v) for v in args.saturation_size.split("x"))
        steps_list = [int(v) for v in args.saturation_steps.split(",")]
        saturate(result, rounds, batches, (size[0], size[1]), steps_list)
        save()
    if "lone" in parts:
        lone(result, args.quick)
        save()
    if "poisson" in parts:
        requests = args.poisson_requests or (30 if args.quick else 120)
        layout = tuple(int(n) for n in args.poisson_layout.split("x"))
        poisson_70(
            result,
            requests,
            args.poisson_rounds,
            in_process=not args.poisson_served_only,
            layout=(layout[0], layout[1]),
        )
        save()
    report(result)
    print(f"wrote {args.out}")


def saturate(
    result: dict[str, Any], rounds: int, batches: int, size: tuple[int, int], steps_list: list[int]
) -> None:
    """Saturation at 8 and 20 steps: recipe, in-process, served, alternating in rounds."""
    from sdxl_server.engine import JaxEngine

    from bench.seed_recipe import SeedRecipe

    slots = DEVICES * SLOTS_PER_DEVICE
    images = batches * slots
    say(f"starting the recipe, the in-process engine and the server ({size[0]}x{size[1]}, 2 x 2 slots)")
    recipe = SeedRecipe(str(BENCH_MODEL_DIR), DEVICES)
    engine = JaxEngine(engine_config(DEVICES, SLOTS_PER_DEVICE, size))
    engine.start()
    in_process = InProcess(engine)
    saturation: dict[str, Any] = {}
    with server(DEVICES, SLOTS_PER_DEVICE, size, "continuous") as target:
        client_run(target, size=size, steps=[8], count=slots, concurrency=slots, offset=90_000)
        in_process.run(slots, 8, size, slots, offset=90_000)
        for steps in steps_list:
            per_round = []
            for r in range(rounds):
                # CPU per image beside images/s: on a shared machine a process's rate follows the CPU
                # share the scheduler gives it, while the CPU it spends per image is its own cost.
                theirs, recipe_cpu_per_image = recipe_rate(recipe, batches, steps, size)
                cpu, counts = process_cpu_seconds(), batch_counts(engine)
                ours = in_process.run(images, steps, size, 2 * slots, offset=r * images)
                ours_cpu = process_cpu_seconds() - cpu
                ours_fullness = batch_fullness(counts, batch_counts(engine))
                cpu, counts = process_cpu_seconds(SERVER_PIDS[target]), batch_counts(target)
                served = client_run(
                    target, size=size, steps=[steps], count=images, concurrency=2 * slots,
                    offset=r * images,
                )  # fmt: skip
                served_cpu = process_cpu_seconds(SERVER_PIDS[target]) - cpu
                served_fullness = batch_fullness(counts, batch_counts(target))
                ours_rate = steady_rate([x["finished_at"] for x in ours["results"]], slots)
                served_rate = steady_rate([x["finished_at"] for x in served["results"]], slots)
                per_round.append(
                    {
                        "recipe": theirs, "in_process": ours_rate, "served": served_rate,
                        "served_budget": mean_phases(served["results"]),
                        "in_process_budget": mean_phases(ours["results"]),
                        "client_cpu_per_call": served["client_cpu_seconds"] / images,
                        "recipe_cpu_per_image": recipe_cpu_per_image,
                        "in_process_cpu_per_image": ours_cpu / images,
                        "server_cpu_per_image": served_cpu / images,
                        "in_process_batches": ours_fullness, "served_batches": served_fullness,
                    }
                )  # fmt: skip
                say(
                    f"{steps} steps round {r}: recipe {theirs:.3f}/s, in-process {ours_rate:.3f}/s, "
                    f"served {served_rate:.3f}/s; CPU s per image recipe "
                    f"{recipe_cpu_per_image:.2f}, in-process {ours_cpu / images:.2f}, "
                    f"server {served_cpu / images:.2f} + client {served['client_cpu_seconds'] / images:.4f}; "
                    f"busy / run UNet rows in-process {ours_fullness['busy_over_run_row_steps']:.3f}, "
                    f"served {served_fullness['busy_over_run_row_steps']:.3f}; VAE rows per image "
                    f"in-process {ours_fullness['decode_rows_per_image']:.2f}, "
                    f"served {served_fullness['decode_rows_per_image']:.2f}"
                )
            saturation[str(steps)] = {
                "rounds": per_round,
                "served_over_recipe": statistics.median(x["served"] / x["recipe"] for x in per_round),
                "in_process_over_recipe": statistics.median(x["in_process"] / x["recipe"] for x in per_round),
                "served_over_in_process": statistics.median(x["served"] / x["in_process"] for x in per_round),
                # Served CPU per image (server + client) over in-process: above 1, what the served path
                # adds in work; the images/s ratio also carries the CPU share each process got.
                "served_over_recipe_cpu_per_image": statistics.median(
                    (x["server_cpu_per_image"] + x["client_cpu_per_call"]) / x["recipe_cpu_per_image"]
                    for x in per_round
                ),
                "served_over_in_process_cpu_per_image": statistics.median(
                    (x["server_cpu_per_image"] + x["client_cpu_per_call"]) / x["in_process_cpu_per_image"]
                    for x in per_round
                ),
            }
    engine.stop()
    result["saturation"] = saturation


def lone(result: dict[str, Any], quick: bool) -> None:
    """A lone request against the recipe at batch 1, and the prompt-embedding cache."""
    from sdxl_server.engine import JaxEngine
    from sdxl_server.engine.event_trace import TraceKind

    from bench.seed_recipe import SeedRecipe

    say("lone request: 4 slots on 1 device, 128x128, 8 steps")
    solo = SeedRecipe(str(BENCH_MODEL_DIR), 1)
    solo.generate(["warm-up"], "", 0, 8, GUIDANCE, SMALL_SIZE[1], SMALL_SIZE[0])
    lone_engine = JaxEngine(engine_config(1, LONE_SLOTS, SMALL_SIZE))
    lone_engine.start()
    lone_in_process = InProcess(lone_engine)
    blocks = 2 if quick else 4
    theirs_s: list[float] = []
    served_lone: list[dict[str, Any]] = []
    ours_lone: list[dict[str, Any]] = []
    with server(1, LONE_SLOTS, SMALL_SIZE, "continuous") as target:
        client_run(target, size=SMALL_SIZE, steps=[8], count=2, offset=80_000)  # warm
        lone_in_process.run(2, 8, SMALL_SIZE, 1, offset=80_000)
        for b in range(blocks):
            for i in range(3):
                began = time.perf_counter()
                solo.generate([prompt(b * 3 + i)], "", b * 3 + i, 8, GUIDANCE, SMALL_SIZE[1], SMALL_SIZE[0])
                theirs_s.append(time.perf_counter() - began)
            served_lone += client_run(target, size=SMALL_SIZE, steps=[8], count=3, offset=1000 + b * 3)[
                "results"
            ]
            ours_lone += lone_in_process.run(3, 8, SMALL_SIZE, 1, offset=2000 + b * 3)["results"]
        # The cache: a prompt not asked before, then the same prompt and seed again.
        twice = {"size": SMALL_SIZE, "steps": [8], "count": 1, "prompt": "a prompt asked twice", "offset": 5}
        first = client_run(target, **twice)["results"][0]
        again = client_run(target, **twice)["results"][0]
    miss = lone_in_process.run(1, 8, SMALL_SIZE, 1, offset=777)
    hit = lone_in_process.run(1, 8, SMALL_SIZE, 1, offset=777)
    encodes = [e.request_id for e in lone_engine.trace() if e.kind is TraceKind.ENCODE]
    lone_engine.stop()
    served_median = statistics.median(r["latency"] for r in served_lone)
    recipe_median = statistics.median(theirs_s)
    in_process_median = statistics.median(r["latency"] for r in ours_lone)
    result["lone"] = {
        "recipe_seconds": theirs_s, "served_seconds": [r["latency"] for r in served_lone],
        "in_process_seconds": [r["latency"] for r in ours_lone],
        "served_over_recipe": served_median / recipe_median,
        "in_process_over_recipe": in_process_median / recipe_median,
        "served_budget": mean_phases(served_lone), "in_process_budget": mean_phases(ours_lone),
    }  # fmt: skip
    result["prompt_cache"] = {
        "served_first_text_encode_seconds": first["phases"]["text_encode"],
        "served_repeat_text_encode_seconds": again["phases"]["text_encode"],
        "served_same_image_bytes": first["sha256"] == again["sha256"],
        "in_process_encodes_of_the_miss": encodes.count("in-process-777"),
        "in_process_repeat_text_encode_seconds": hit["results"][0]["phases"]["text_encode"],
        "in_process_first_text_encode_seconds": miss["results"][0]["phases"]["text_encode"],
    }  # fmt: skip


def poisson_70(
    result: dict[str, Any],
    requests: int,
    rounds: int,
    in_process: bool = True,
    layout: tuple[int, int] = (DEVICES, SLOTS_PER_DEVICE),
) -> None:
    """Poisson arrivals at 70% of the served capacity, continuous against static, served, and the same
    arrivals in-process beside them (unless `in_process` is False): what the served path adds.

    Every side runs one step per dispatch, as the server ships: at K steps per dispatch an arrival waits
    for the running call's K steps before it can join, which costs continuous batching its point (the
    first served figure, 0.75, ran at K=4). The capacity is that of the continuous server with the same
    step mix, the median of three saturated rounds (one round of 24 requests once read 30% low, which
    puts "70%" near half the real capacity).

    Both servers and both in-process engines stay up (an idle engine's step loop sleeps on its queue) and
    the sides take turns in rounds, each round on its own arrivals, which every side gets, the first side
    rotating every round: on a shared machine the load drifts within minutes, and one side run after the
    other would read the drift as the side's. Each side's p50/p99 pool every round's requests.
    """
    from sdxl_server.engine import JaxEngine

    devices, slots_per_device = layout
    slots = devices * slots_per_device
    per_round = max(1, requests // rounds)
    poisson: dict[str, Any] = {
        "requests_per_policy": per_round * rounds, "rounds": rounds, "steps_per_dispatch": 1,
        "devices": devices, "slots_per_device": slots_per_device,
    }  # fmt: skip
    policies = ("continuous", "static")
    # "apart": the continuous server with --engine-per-device (engine/group/), on the same arrivals; and
    # "static-apart", the static policy per device, so that the goal's yardstick is shown both ways.
    # (One device has nothing to keep apart: the group would be the plain engine.)
    served = {p: (p, False) for p in policies}
    if devices > 1:
        served |= {"apart": ("continuous", True), "static-apart": ("static", True)}
    sides = [f"served {p}" for p in served] + ([f"in-process {p}" for p in policies] if in_process else [])
    latencies: dict[str, list[float]] = {side: [] for side in sides}
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
    with contextlib.ExitStack() as stack:
        targets = {
            name: stack.enter_context(
                server(
                    devices,
                    slots_per_device,
                    SMALL_SIZE,
                    policy,
                    steps_per_dispatch=1,
                    engine_per_device=apart,
                )
            )
            for name, (policy, apart) in served.items()
        }
        engines: dict[str, InProcess] = {}
        if in_process:
            for policy in policies:
                engine = JaxEngine(engine_config(devices, slots_per_device, SMALL_SIZE, policy, 1))
                engine.start()
                stack.callback(engine.stop)
                engines[policy] = InProcess(engine)

        def open_loop(side: str, count: int, rate: float, seed: int, offset: int) -> dict[str, Any]:
            where, policy = side.split(" ")
            if where == "served":
                return client_run(
                    targets[policy], size=SMALL_SIZE, steps=list(STEP_MIX), count=count, mode="open",
                    rate=rate, seed=seed, offset=offset,
                )  # fmt: skip
            return engines[policy].open_loop(count, list(STEP_MIX), SMALL_SIZE, rate, seed, offset)

        for side in sides:
            # Warm every step count of the mix: a step count's first request may build its schedule.
            open_loop(side, len(STEP_MIX), 100.0, 0, 70_000)
        capacities = []
        for r in range(3):
            capacity_run = client_run(
                targets["continuous"], size=SMALL_SIZE, steps=list(STEP_MIX), count=8 * slots,
                concurrency=2 * slots, offset=60_000 + 100 * r,
            )  # fmt: skip
            capacities.append(steady_rate([x["finished_at"] for x in capacity_run["results"]], slots))
        capacity = statistics.median(capacities)
        poisson["capacity_rounds"] = capacities
        poisson["capacity_images_per_second"] = capacity
        shown = ", ".join(f"{c:.3f}" for c in capacities)
        say(f"capacity with mixed steps: {capacity:.3f}/s (rounds {shown})")
        rate = 0.7 * capacity
        for r in range(rounds):
            for side in sides[r % len(sides) :] + sides[: r % len(sides)]:
                load_before = os.getloadavg()
                run = open_loop(side, per_round, rate, 3 + r, 1000 * r)
                results = run["results"]
                got = np.array([x["latency"] for x in results])
                quarter = max(1, per_round // 4)
                wall = max(x["finished_at"] for x in results) - run["began"]
                runs[side].append(
                    {
                        "round": r, "offered_per_second": rate, "served_per_second": per_round / wall,
                        "p50": float(np.percentile(got, 50)), "p99": float(np.percentile(got, 99)),
                        "late_over_early_p50": float(np.median(got[-quarter:]) / np.median(got[:quarter])),
                        "budget": mean_phases(results), "load_average_before": load_before,
                        "load_average_after": os.getloadavg(),
                    }
                )  # fmt: skip
                latencies[side] += [float(x) for x in got]
                say(
                    f"Poisson 70% round {r + 1} {side}: p50 {runs[side][-1]['p50']:.2f}s "
                    f"p99 {runs[side][-1]['p99']:.2f}s (load {load_before[0]:.1f})"
                )
    for side in sides:
        pooled = np.array(latencies[side])
        # "continuous"/"static" are the served sides (the goal's); "in-process continuous" etc. beside
        key = side.removeprefix("served ")
        poisson[key] = {
            "offered_per_second": rate,
            "p50": float(np.percentile(pooled, 50)),
            "p99": float(np.percentile(pooled, 99)),
            "max": float(pooled.max()),
            "p99_by_round": [x["p99"] for x in runs[side]],
            "runs": runs[side],
            "latencies": latencies[side],
        }
        got = poisson[key]
        say(f"Poisson 70% {side}, pooled: p50 {got['p50']:.2f}s p99 {got['p99']:.2f}s max {got['max']:.2f}s")
    for prefix, side, name in (
        ("", "continuous", "continuous_p99_over_static"),
        ("", "apart", "apart_p99_over_static"),
        ("", "static-apart", "static_apart_p99_over_static"),
        ("in-process ", "continuous", "in_process_continuous_p99_over_static"),
    ):
        if prefix + "static" not in poisson or prefix + side not in poisson:
            continue
        poisson[name] = poisson[prefix + side]["p99"] / poisson[prefix + "static"]["p99"]
        poisson[name + "_by_round"] = [
            c["p99"] / s["p99"]
            for c, s in zip(poisson[prefix + side]["runs"], poisson[prefix + "static"]["runs"], strict=True)
        ]
    if in_process:
        for policy in policies:
            poisson[f"{policy}_p99_served_over_in_process"] = (
                poisson[policy]["p99"] / poisson[f"in-process {policy}"]["p99"]
            )
    result["poisson_70"] = poisson


def report(result: dict[str, Any]) -> None:
    print(f"\nmachine {result['machine']}; load average before {result['load_average_before'][0]:.1f}")
    print(f"{'measure':<52}{'ratio':>8}  goal")
    saturation = result.get("saturation", {})
    for steps, s in saturation.items():
        print(f"{f'saturated served / recipe, {steps} steps':<52}{s['served_over_recipe']:>8.3f}  >= 0.95")
        print(f"{f'saturated in-process / recipe, {steps} steps':<52}{s['in_process_over_recipe']:>8.3f}")
        print(f"{f'saturated served / in-process, {steps} steps':<52}{s['served_over_in_process']:>8.3f}")
        label = f"CPU per image, served / recipe, {steps} steps"
        print(f"{label:<52}{s['served_over_recipe_cpu_per_image']:>8.3f}  <= 1.05")
        label = f"CPU per image, served / in-process, {steps} steps"
        print(f"{label:<52}{s['served_over_in_process_cpu_per_image']:>8.3f}")
    rows = []
    if "lone" in result:
        lone = result["lone"]
        print(f"{'lone served / recipe batch 1':<52}{lone['served_over_recipe']:>8.3f}  <= 1.1")
        print(f"{'lone in-process / recipe batch 1':<52}{lone['in_process_over_recipe']:>8.3f}")
        rows = [("lone served", lone["served_budget"]), ("lone in-process", lone["in_process_budget"])]
    if "poisson_70" in result:
        poisson = result["poisson_70"]
        layout = f"{poisson.get('devices', DEVICES)}x{poisson.get('slots_per_device', SLOTS_PER_DEVICE)}"
        ratio = poisson["continuous_p99_over_static"]
        print(f"{f'Poisson 70% ({layout}): continuous p99 / static p99, served':<52}{ratio:>8.3f}  <= 0.6")
        if "apart_p99_over_static" in poisson:
            ratio = poisson["apart_p99_over_static"]
            print(f"{'Poisson 70%: engine per device p99 / static p99, served':<52}{ratio:>8.3f}  <= 0.6")
            ratio = poisson["apart_p99_over_static"] / poisson["static_apart_p99_over_static"]
            print(f"{'  the same / static with an engine per device':<52}{ratio:>8.3f}")
        if "in_process_continuous_p99_over_static" in poisson:
            ratio = poisson["in_process_continuous_p99_over_static"]
            print(f"{'Poisson 70%: continuous p99 / static p99, in-process':<52}{ratio:>8.3f}")
            for policy in ("continuous", "static"):
                ratio = poisson[f"{policy}_p99_served_over_in_process"]
                print(f"{f'Poisson 70%: {policy} p99, served / in-process':<52}{ratio:>8.3f}")
    if "prompt_cache" in result:
        cache = result["prompt_cache"]
        print(
            f"prompt cache: served repeat text_encode {cache['served_repeat_text_encode_seconds']:.4f}s "
            f"(first {cache['served_first_text_encode_seconds']:.4f}s), same image bytes "
            f"{cache['served_same_image_bytes']}; in-process encodes of the repeated prompt "
            f"{cache['in_process_encodes_of_the_miss']}"
        )
    for steps, s in saturation.items():
        last = s["rounds"][-1]
        rows += [(f"saturated {steps} steps served", last["served_budget"])]
        rows += [(f"saturated {steps} steps in-process", last["in_process_budget"])]
    print(f"\ntime budget, mean seconds per request ({', '.join(PHASES)})")
    print(f"{'':<34}" + "".join(f"{p[:9]:>10}" for p in PHASES))
    for label, budget in rows:
        print(f"{label:<34}" + "".join(f"{budget.get(p, float('nan')):>10.4f}" for p in PHASES))
    for steps, s in saturation.items():
        print(f"client CPU per call, {steps} steps: {1000 * s['rounds'][-1]['client_cpu_per_call']:.2f} ms")


if __name__ == "__main__":
    main()
