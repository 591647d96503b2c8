"""What the lockstep costs the Poisson tail: the engine over 2 devices against an engine per device.

The engine runs every device in one SPMD program per step, so every device pays the busiest device's row
bucket and waits for it, and a decode on one device holds the step of all (the lockstep). The queueing
model (bench/batching_model.py, policy "apart") says devices on their own clocks would cut continuous
batching's p99 at 70% load by about a quarter. This measures it on the engine itself, in-process, on the
Poisson workload of bench/served_vs_recipe.py's Poisson part (the bench model, 128x128, guidance 7.5,
steps 4..14, one step per dispatch), three sides on the same arrivals:

- "lockstep": one continuous engine over 2 devices x 2 slots (what the server runs);
- "apart": two continuous engines of 1 device x 2 slots each (`first_device` 0 and 1), every request
  sent to the one with the fewest images outstanding (join the shortest queue), a prototype of an
  engine per device that the server does not have;
- "static": one static engine over 2 devices x 2 slots, the goal's yardstick.

The rate is 70% of the lockstep engine's saturated capacity with the same step mix. The sides take turns
in rounds, the first side rotating (on a shared machine the load drifts within minutes); p50/p99 pool
every round. Beside each side: the lockstep's padding (busy / run UNet row-steps, from the engine's
counters) and the capacities. On this CPU the two "devices" share 2 cores, so a device that idles in
the lockstep leaves its core to the other's threads; on a TPU a chip that waits is lost. The CPU figure
is the floor of what devices apart buy.

    XLA_FLAGS=--xla_force_host_platform_device_count=2 .venv/bin/python bench/devices_apart.py \
        [--requests 240] [--rounds 4]        # table + bench/results/devices_apart.json
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")

import argparse
import contextlib
import dataclasses
import json
import statistics
import threading
from pathlib import Path
from typing import Any

import numpy as np

from bench.served_vs_recipe import (
    DEVICES,
    SLOTS_PER_DEVICE,
    SMALL_SIZE,
    STEP_MIX,
    InProcess,
    batch_counts,
    batch_fullness,
    engine_config,
    say,
    steady_rate,
)

RESULTS = Path(__file__).parent / "results" / "devices_apart.json"
SIDES = ("lockstep", "apart", "static")


class EnginePerDevice:
    """Engines of one device each behind one `submit`: a request goes to the engine with the fewest
    images outstanding (ties: the lowest device). A bench prototype, not the server's: it has no
    cancel, stats or health of its own."""

    def __init__(self, engines: list[Any]) -> None:
        self.engines = engines
        self._outstanding = [0] * len(engines)
        self._lock = threading.Lock()

    def submit(self, request: Any, listener: Any) -> Any:
        from sdxl_server.engine.api import Failed, Finished

        with self._lock:
            chosen = min(range(len(self.engines)), key=lambda i: self._outstanding[i])
            self._outstanding[chosen] += request.num_images

        def counted(event: object) -> None:
            if isinstance(event, Finished | Failed):
                with self._lock:
                    self._outstanding[chosen] -= 1
            listener(event)

        return self.engines[chosen].submit(request, counted)


def capacity(side: InProcess, slots: int, repeats: int = 3) -> list[float]:
    """Saturated images/s with the step mix: a closed loop keeping 2 x slots in flight, each of `repeats`
    runs read over its steady window (every slot busy)."""
    rates = []
    for r in range(repeats):
        run = side.run(8 * slots, list(STEP_MIX), SMALL_SIZE, 2 * slots, offset=60_000 + 100 * r)
        rates.append(steady_rate([x["finished_at"] for x in run["results"]], slots))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=240, help="requests per side, over all rounds")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--load", type=float, default=0.7, help="offered rate / the lockstep's capacity")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    from sdxl_server.engine import JaxEngine

    from bench.bench_model import prepare_side_by_side

    prepare_side_by_side(DEVICES)
    slots = DEVICES * SLOTS_PER_DEVICE
    per_round = max(1, args.requests // args.rounds)
    with contextlib.ExitStack() as stack:

        def started(config: Any) -> Any:
            engine = JaxEngine(config)
            engine.start()
            stack.callback(engine.stop)
            return engine

        lockstep = started(engine_config(DEVICES, SLOTS_PER_DEVICE, SMALL_SIZE, "continuous", 1))
        static = started(engine_config(DEVICES, SLOTS_PER_DEVICE, SMALL_SIZE, "static", 1))
        apart = [
            started(
                dataclasses.replace(
                    engine_config(1, SLOTS_PER_DEVICE, SMALL_SIZE, "continuous", 1), first_device=d
                )
            )
            for d in range(DEVICES)
        ]
        sides = {
            "lockstep": InProcess(lockstep),
            "apart": InProcess(EnginePerDevice(apart)),
            "static": InProcess(static),
        }
        for side in sides.values():  # a step count's first request may build its schedule
            side.open_loop(len(STEP_MIX), list(STEP_MIX), SMALL_SIZE, 100.0, 0, 70_000)
        capacities = {name: capacity(sides[name], slots) for name in SIDES}
        rate = args.load * statistics.median(capacities["lockstep"])
        say(
            "capacities, images/s: "
            + "; ".join(f"{n} {', '.join(f'{c:.2f}' for c in v)}" for n, v in capacities.items())
        )
        latencies: dict[str, list[float]] = {name: [] for name in SIDES}
        rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in SIDES}
        for r in range(args.rounds):
            for name in SIDES[r % len(SIDES) :] + SIDES[: r % len(SIDES)]:
                before = batch_counts(lockstep) if name == "lockstep" else None
                run = sides[name].open_loop(per_round, list(STEP_MIX), SMALL_SIZE, rate, 3 + r, 1000 * r)
                got = [x["latency"] for x in run["results"]]
                latencies[name] += got
                record = {
                    "round": r, "p50": float(np.percentile(got, 50)), "p99": float(np.percentile(got, 99)),
                    "load_average_before": os.getloadavg()[0],
                }  # fmt: skip
                if before is not None:
                    record.update(batch_fullness(before, batch_counts(lockstep)))
                rounds[name].append(record)
                say(f"round {r + 1} {name}: p50 {record['p50']:.2f}s p99 {record['p99']:.2f}s")
    result: dict[str, Any] = {
        "command": "bench/devices_apart.py "
        + " ".join(f"--{k} {v}" for k, v in vars(args).items() if k != "out"),
        "offered_per_second": rate,
        "capacities": capacities,
        "requests_per_side": per_round * args.rounds,
    }
    for name in SIDES:
        pooled = np.array(latencies[name])
        result[name] = {"p50": float(np.percentile(pooled, 50)), "p99": float(np.percentile(pooled, 99)),
                        "rounds": rounds[name], "latencies": latencies[name]}  # fmt: skip
    static_p99 = result["static"]["p99"]
    print(
        f"\nPoisson {args.load:.0%} of the lockstep's capacity ({rate:.2f} images/s), "
        f"{per_round * args.rounds} requests a side"
    )
    print(f"{'side':<10}{'capacity/s':>11}{'p50 s':>8}{'p99 s':>8}{'p99 / static':>14}  p99 by round")
    for name in SIDES:
        side = result[name]
        by_round = ", ".join(f"{x['p99']:.2f}" for x in side["rounds"])
        print(f"{name:<10}{statistics.median(capacities[name]):>11.2f}{side['p50']:>8.2f}{side['p99']:>8.2f}"
              f"{side['p99'] / static_p99:>14.3f}  {by_round}")  # fmt: skip
    padding = ", ".join(f"{1 - x['busy_over_run_row_steps']:.2f}" for x in result["lockstep"]["rounds"])
    print(f"lockstep padding (UNet row-steps run empty / run), by round: {padding}")
    print(f"apart p99 / lockstep p99: {result['apart']['p99'] / result['lockstep']['p99']:.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
