"""A queueing model of the engine's batching policies, to read the Poisson figures of the benchmarks.

Not a measurement: a discrete-event simulation of the engine's scheduling rules (a bank of D devices x S
slots, admission at step boundaries onto the least-loaded device, a step whose cost follows the busiest
device's bucket, finished images decoded at the boundary), under the Poisson workload of
``bench/engine_vs_recipe.py`` and ``bench/served_vs_recipe.py`` (steps uniform in 4..14). It answers
questions the measurements cannot, because this machine has one kind of device and one engine: how much
lower is continuous batching's p99 than static batching's, at 50/70/90% of capacity, as a function of what
batching buys on the device, and what the engine's lockstep costs.

Three policies:
- ``continuous``: the engine's. Every device runs one SPMD program per step, so every device pays the
  busiest device's bucket and waits for it (the lockstep); a free slot is refilled at the next boundary.
- ``static``: the recipe's. A new batch only once the whole bank is empty.
- ``apart``: continuous batching with each device on its own clock: a device steps at its own bucket's
  cost and admits at its own boundaries. Not built; the model says what it would buy.

``--step-cost-growth g`` models a step of b images per device as costing ``1 + g (b - 1)`` steps of one:
g = 1 is a device where batching buys nothing, g near 0 an accelerator with room to spare at this batch
(on this CPU the bench model's step of 2 images costs about 1.6 of one: g = 0.6). Even at g = 1 static
batching is not work-conserving across devices: as its batch drains, the images left may sit on one
device while the others idle, and arrivals wait for the whole batch. What the model leaves out is every
cost outside the step and the decode (admission, host work, dispatch), so a measured gap to it points at
those.

A p99 is a tail: pooled over few seeds it swings with a single long busy period (static's at 70% read 94
to 129 steps between 4 and 24 seeds of 1,000 requests), so the default pools 24 runs of 1,000.

    .venv/bin/python bench/batching_model.py            # table + bench/results/batching_model.json
    .venv/bin/python bench/batching_model.py --devices 1 --slots-per-device 4   # one pool of 4 slots
    .venv/bin/python bench/batching_model.py --admission-gates --slots-per-device 4  # gated admission

Two simulated CPU devices share this host's cores, so to a queue they are one device of their slots
together (docs/PERFORMANCE.md, "Eighteenth session"): ``--devices 1`` models this machine, the default
``--devices 2`` models two chips.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results" / "batching_model.json"
STEP_MIX = tuple(range(4, 15))  # the same step counts as engine_vs_recipe.py draws from, uniformly
LOADS = (0.5, 0.7, 0.9)
POLICIES = ("continuous", "apart", "static")


def bucket(busy: int) -> int:
    """The compiled batch size covering ``busy`` images: 1, 2, 4, ..."""
    return 1 << math.ceil(math.log2(busy)) if busy else 0


class Workload:
    """``requests`` Poisson arrivals at ``rate`` per unit of time, each with its steps from STEP_MIX."""

    def __init__(self, rate: float, requests: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.arrivals = np.cumsum(rng.exponential(1 / rate, requests))
        self.steps = rng.choice(STEP_MIX, requests)


def step_cost(images: int, growth: float) -> float:
    return 1 + growth * (bucket(images) - 1)


# An admission gate: may the request at the queue's head (waiting for `waited` units) take a free slot
# while `in_flight` images are being denoised? Continuous batching's own rule is "always".
Gate = Callable[[int, float], bool]


def simulate(
    policy: str,
    work: Workload,
    *,
    devices: int,
    slots: int,
    growth: float,
    decode: float,
    gate: Gate | None = None,
) -> tuple[np.ndarray, float, float]:
    """Latencies, images served per unit of time, and the share of image-steps run that were padding;
    the unit is one guided step of one image, a decode of one image costs ``decode`` units. `gate`
    (continuous only) holds a free slot empty while it says no."""
    if policy == "apart":
        return _simulate_apart(work, devices=devices, slots=slots, growth=growth, decode=decode)
    requests = len(work.arrivals)
    arrivals, steps_left = work.arrivals, work.steps.copy()
    latencies = np.zeros(requests)
    bank: list[list[int]] = [[] for _ in range(devices)]  # the requests in each device's slots
    queue: list[int] = []
    now, arrived = 0.0, 0
    run = busy = 0
    while arrived < requests or queue or any(bank):
        while arrived < requests and arrivals[arrived] <= now:
            queue.append(arrived)
            arrived += 1
        # Admission at the boundary: continuous fills any free slot; static only an empty bank.
        if policy == "continuous" or not any(bank):
            while queue and (free := [d for d in range(devices) if len(bank[d]) < slots]):
                if gate is not None and not gate(sum(map(len, bank)), now - arrivals[queue[0]]):
                    break
                bank[min(free, key=lambda d: len(bank[d]))].append(queue.pop(0))
        if not any(bank):
            now = float(arrivals[arrived])  # idle until the next arrival
            continue
        # Every device runs the same program: the bucket of the busiest one.
        widest = bucket(max(len(b) for b in bank))
        now += step_cost(widest, growth)
        run += widest * devices
        busy += sum(len(b) for b in bank)
        finished: list[list[int]] = []
        for b in bank:
            for index in b:
                steps_left[index] -= 1
            finished.append([index for index in b if steps_left[index] == 0])
            b[:] = [index for index in b if steps_left[index] > 0]
        if any(finished):
            now += decode * step_cost(max(len(f) for f in finished), growth)
            for index in (i for f in finished for i in f):
                latencies[index] = now - arrivals[index]
    return latencies, requests / (now - float(arrivals[0])), 1 - busy / run


def _simulate_apart(
    work: Workload, *, devices: int, slots: int, growth: float, decode: float
) -> tuple[np.ndarray, float, float]:
    """Continuous batching with a clock per device: the device whose boundary comes first admits from
    the shared queue into its own free slots, then runs its own bucket's step and decodes its own
    finished images. No padding: a device runs the images it has."""
    requests = len(work.arrivals)
    arrivals, steps_left = work.arrivals, work.steps.copy()
    latencies = np.zeros(requests)
    clock = [0.0] * devices
    bank: list[list[int]] = [[] for _ in range(devices)]
    queue: list[int] = []
    arrived = done = 0
    while done < requests:
        d = min(range(devices), key=lambda x: clock[x])  # the next boundary, of whichever device
        while arrived < requests and arrivals[arrived] <= clock[d]:
            queue.append(arrived)
            arrived += 1
        while queue and len(bank[d]) < slots:
            bank[d].append(queue.pop(0))
        if not bank[d]:  # idle until the next arrival, or for good once none is left
            clock[d] = float(arrivals[arrived]) if arrived < requests else math.inf
            continue
        clock[d] += step_cost(len(bank[d]), growth)
        for index in bank[d]:
            steps_left[index] -= 1
        finished = [index for index in bank[d] if steps_left[index] == 0]
        bank[d][:] = [index for index in bank[d] if steps_left[index] > 0]
        if finished:
            clock[d] += decode * step_cost(len(finished), growth)
            for index in finished:
                latencies[index] = clock[d] - arrivals[index]
                done += 1
    end = max(latencies + work.arrivals)
    return latencies, requests / (end - float(arrivals[0])), 0.0


def compare(growth: float, decode: float, devices: int, slots: int, requests: int, seeds: int) -> dict:
    """p50/p99 of each policy at each load of the (lockstep) continuous policy's saturated capacity,
    every policy on the same arrivals."""
    shape = {"devices": devices, "slots": slots, "growth": growth, "decode": decode}
    capacity = {policy: simulate(policy, Workload(100.0, 4000, seed=0), **shape)[1] for policy in POLICIES}
    rows = []
    for load in LOADS:
        row: dict[str, float] = {"load": load}
        workloads = [Workload(load * capacity["continuous"], requests, seed) for seed in range(1, seeds + 1)]
        for policy in POLICIES:
            runs = [simulate(policy, work, **shape) for work in workloads]
            latencies = np.concatenate([latency for latency, _, _ in runs])
            row[f"{policy}_p50"] = float(np.percentile(latencies, 50))
            row[f"{policy}_p99"] = float(np.percentile(latencies, 99))
            row[f"{policy}_padding"] = float(np.mean([padding for _, _, padding in runs]))
        for policy in ("continuous", "apart"):
            row[f"{policy}_p99_over_static"] = row[f"{policy}_p99"] / row["static_p99"]
        rows.append(row)
    return {
        **shape,
        "capacity_images_per_unit": capacity["continuous"],
        "capacity_over_continuous": {p: capacity[p] / capacity["continuous"] for p in POLICIES},
        "rows": rows,
    }


def gate_table(growth: float, decode: float, slots: int, requests: int, seeds: int) -> list[dict]:
    """One device of `slots` slots at 70% of continuous batching's capacity: continuous batching's p99,
    and that of continuous batching behind admission gates that trade throughput for less sharing,
    over static batching's p99, on the same arrivals. The question: can any admission rule of a
    continuous batcher reach a p99 of 0.6x static's on one device, where the devices are not apart?"""
    shape = {"devices": 1, "slots": slots, "growth": growth, "decode": decode}
    capacity = simulate("continuous", Workload(100.0, 4000, seed=0), **shape)[1]
    workloads = [Workload(0.7 * capacity, requests, seed) for seed in range(1, seeds + 1)]

    def p99(policy: str, gate: Gate | None = None) -> float:
        runs = [simulate(policy, work, **shape, gate=gate)[0] for work in workloads]
        return float(np.percentile(np.concatenate(runs), 99))

    gates: dict[str, Gate | None] = {"continuous (always admit)": None}
    for cap in range(1, slots):
        gates[f"at most {cap} in flight"] = lambda n, _, cap=cap: n < cap
        for wait in (5, 10, 20):  # steps of one image
            gates[f"at most {cap} unless the head waited {wait}"] = lambda n, waited, cap=cap, wait=wait: (
                n < cap or waited > wait
            )
    static = p99("static")
    return [
        {"gate": name, "p99_over_static": p99("continuous", gate) / static} for name, gate in gates.items()
    ]


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
        default=[1.0, 0.6, 0.25, 0.1],
        help="extra cost of each further image in a step, in steps of one image (0.6: this CPU)",
    )
    parser.add_argument("--requests", type=int, default=1000, help="requests per seed and point")
    parser.add_argument("--seeds", type=int, default=24)
    parser.add_argument(
        "--admission-gates",
        action="store_true",
        help="instead: one device of --slots-per-device slots at 70%% load, continuous batching behind "
        "admission gates against static batching (does any rule reach 0.6 where devices are not apart?)",
    )
    args = parser.parse_args()
    if args.admission_gates:
        for growth in args.step_cost_growth:
            rows = gate_table(growth, args.decode, args.slots_per_device, args.requests, args.seeds)
            print(f"one device x {args.slots_per_device} slots, growth {growth}, 70% load, p99 / static's:")
            for row in rows:
                print(f"  {row['gate']:<44}{row['p99_over_static']:>6.2f}")
        return
    results = [
        compare(g, args.decode, args.devices, args.slots_per_device, args.requests, args.seeds)
        for g in args.step_cost_growth
    ]
    print(
        f"model: {args.devices} devices x {args.slots_per_device} slots, "
        f"steps {STEP_MIX[0]}..{STEP_MIX[-1]}, "
        f"decode {args.decode} steps, {args.requests * args.seeds} requests per point and policy"
    )
    print(
        f"{'growth':>7}{'load':>6}{'cont p50':>10}{'cont p99':>10}{'apart p50':>11}{'apart p99':>11}"
        f"{'stat p50':>10}{'stat p99':>10}{'cont/stat':>11}{'apart/stat':>12}{'padding':>9}"
    )
    for result in results:
        for row in result["rows"]:
            print(
                f"{result['growth']:>7.2f}{row['load']:>6.1f}"
                f"{row['continuous_p50']:>10.1f}{row['continuous_p99']:>10.1f}"
                f"{row['apart_p50']:>11.1f}{row['apart_p99']:>11.1f}"
                f"{row['static_p50']:>10.1f}{row['static_p99']:>10.1f}"
                f"{row['continuous_p99_over_static']:>11.2f}{row['apart_p99_over_static']:>12.2f}"
                f"{row['continuous_padding']:>9.2f}"
            )
    for result in results:
        shares = ", ".join(f"{p} {v:.2f}" for p, v in result["capacity_over_continuous"].items())
        print(f"capacity at growth {result['growth']:.2f}, over continuous's: {shares}")
    print("(latencies in guided steps of one image; padding: the lockstep's share of image-steps run empty)")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"step_mix": STEP_MIX, "models": results}, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
