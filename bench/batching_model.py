"""A queueing model of the two batching policies, to read the Poisson figures of engine_vs_recipe.py.

Not a measurement: a discrete-event simulation of the engine's scheduling rules (a bank of D devices x S
slots, admission at step boundaries onto the least-loaded device, a step whose cost follows the busiest
device's bucket, finished images decoded at the boundary), under the Poisson workload of
``bench/engine_vs_recipe.py`` (steps uniform in its mix). It answers one question the measurements
cannot, because this machine has one kind of device: how much lower is continuous batching's p99 than
static batching's, at 50/70/90% of capacity, as a function of what batching buys on the device?

``--step-cost-growth g`` models a step of b images per device as costing ``1 + g (b - 1)`` steps of one:
g = 1 is a device where batching buys nothing (this CPU: engine_vs_recipe.py prints the measured
``largest_bucket_over_singles``), g near 0 an accelerator with room to spare at this batch. Even at
g = 1 static batching is not work-conserving across devices: as its batch drains, the images left may
sit on one device while the others idle, and arrivals wait for the whole batch. What the model leaves
out is every cost outside the step and the decode (admission, host work, dispatch), so a measured gap
to it points at those. One command:

    .venv/bin/python bench/batching_model.py            # table + bench/results/batching_model.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results" / "batching_model.json"
STEP_MIX = tuple(range(4, 15))  # the same step counts as engine_vs_recipe.py draws from, uniformly
LOADS = (0.5, 0.7, 0.9)


def bucket(busy: int) -> int:
    """The compiled batch size covering ``busy`` images: 1, 2, 4, ..."""
    return 1 << math.ceil(math.log2(busy)) if busy else 0


def simulate(
    policy: str,
    rate: float,
    requests: int,
    *,
    devices: int,
    slots: int,
    growth: float,
    decode: float,
    seed: int,
) -> tuple[np.ndarray, float]:
    """Latencies of ``requests`` Poisson arrivals at ``rate`` per unit of time, and the images served per
    unit; the unit is one guided step of one image, a decode of one image costs ``decode`` units."""
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1 / rate, requests))
    steps_left = rng.choice(STEP_MIX, requests)
    latencies = np.zeros(requests)
    bank: list[list[int]] = [[] for _ in range(devices)]  # the requests in each device's slots
    queue: list[int] = []
    now, arrived = 0.0, 0
    while arrived < requests or queue or any(bank):
        while arrived < requests and arrivals[arrived] <= now:
            queue.append(arrived)
            arrived += 1
        # Admission at the boundary: continuous fills any free slot; static only an empty bank.
        if policy == "continuous" or not any(bank):
            while queue and (free := [d for d in range(devices) if len(bank[d]) < slots]):
                bank[min(free, key=lambda d: len(bank[d]))].append(queue.pop(0))
        if not any(bank):
            now = float(arrivals[arrived])  # idle until the next arrival
            continue
        # Every device runs the same program: the bucket of the busiest one.
        now += 1 + growth * (bucket(max(len(b) for b in bank)) - 1)
        finished: list[list[int]] = []
        for b in bank:
            for index in b:
                steps_left[index] -= 1
            finished.append([index for index in b if steps_left[index] == 0])
            b[:] = [index for index in b if steps_left[index] > 0]
        if any(finished):
            now += decode * (1 + growth * (bucket(max(len(f) for f in finished)) - 1))
            for index in (i for f in finished for i in f):
                latencies[index] = now - arrivals[index]
    return latencies, requests / (now - float(arrivals[0]))


def compare(growth: float, decode: float, devices: int, slots: int, requests: int, seeds: int) -> dict:
    """p50/p99 of both policies at each load of the continuous policy's saturated capacity."""
    shape = {"devices": devices, "slots": slots, "growth": growth, "decode": decode}
    _, capacity = simulate("continuous", 100.0, 4000, seed=0, **shape)
    rows = []
    for load in LOADS:
        row: dict[str, float] = {"load": load}
        for policy in ("continuous", "static"):
            runs = [simulate(policy, load * capacity, requests, seed=s, **shape) for s in range(1, seeds + 1)]
            latencies = np.concatenate([latency for latency, _ in runs])
            row[f"{policy}_p50"] = float(np.percentile(latencies, 50))
            row[f"{policy}_p99"] = float(np.percentile(latencies, 99))
        row["p99_ratio"] = row["continuous_p99"] / row["static_p99"]
        row["p50_ratio"] = row["continuous_p50"] / row["static_p50"]
        rows.append(row)
    return {**shape, "capacity_images_per_unit": capacity, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--slots-per-device", type=int, default=2)
    parser.add_argument("--decode", type=float, default=1.35, help="decode of one image / guided step of one")
    parser.add_argument(
        "--step-cost-growth",
        type=float,
        nargs="+",
        default=[1.0, 0.5, 0.25, 0.1],
        help="extra cost of each further image in a step, in steps of one image (1: this CPU)",
    )
    parser.add_argument("--requests", type=int, default=2000, help="requests per seed and point")
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    results = [
        compare(g, args.decode, args.devices, args.slots_per_device, args.requests, args.seeds)
        for g in args.step_cost_growth
    ]
    print(
        f"model: {args.devices} devices x {args.slots_per_device} slots, "
        f"steps {STEP_MIX[0]}..{STEP_MIX[-1]}, "
        f"decode {args.decode} steps, {args.requests * args.seeds} requests per point"
    )
    print(
        f"{'growth':>7}{'load':>6}{'cont p50':>10}{'cont p99':>10}"
        f"{'stat p50':>10}{'stat p99':>10}{'p99 ratio':>11}"
    )
    for result in results:
        for row in result["rows"]:
            print(
                f"{result['growth']:>7.2f}{row['load']:>6.1f}{row['continuous_p50']:>10.1f}"
                f"{row['continuous_p99']:>10.1f}{row['static_p50']:>10.1f}{row['static_p99']:>10.1f}"
                f"{row['p99_ratio']:>11.2f}"
            )
    print("(latencies in guided steps of one image)")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"step_mix": STEP_MIX, "models": results}, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
