"""Where the adapter step's time goes (issue 23): the serving bench's own step programs timed alone, the
plain step against the adapter step at each stack width, with XLA's cost analysis of each.

Starts the engine of bench/lora_serving.py (the bench model, 2 CPU devices x 2 slots, 128x128, 16 places
at rank 16, `--loras-per-request` wide) and calls its compiled step programs directly on its empty bank
(a step's cost is its row bucket's, whatever the slots hold), round-robin so the shared machine's drift
reaches them all alike. Per program: the median device seconds of a call (dispatch to result), the host
seconds until the call returns (what the bank's ~260 arrays as arguments cost per dispatch), FLOPs and
bytes accessed against the plain step's, and the compiled program's instruction count (on the CPU a small
UNet's time is as much per-operation overhead as arithmetic).

    .venv/bin/python bench/lora_step_profile.py [--repeats 15] [--k 4] [--loras-per-request 4]
        [--out bench/results/lora_step_profile.json]
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")

import argparse
import json
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from sdxl_server.engine import JaxEngine

from bench.bench_model import prepare_side_by_side
from bench.lora_serving import DEVICES, MAX_STEPS, RESOLUTION, engine_config
from bench.paths import RESULTS_DIR

RESULTS = RESULTS_DIR / "lora_step_profile.json"


def figures(compiled: Any) -> dict[str, float]:
    costs = compiled.cost_analysis()
    costs = costs[0] if isinstance(costs, list) else costs
    text = compiled.as_text()
    return {
        "flops": float(costs.get("flops", 0.0)),
        "bytes_accessed": float(costs.get("bytes accessed", 0.0)),
        "instructions": len(re.findall(r"^\s+%?\S+ = ", text, re.M)),
    }


def profile(engine: JaxEngine, k: int, repeats: int) -> dict[str, dict[str, float]]:
    import jax
    from sdxl_server.engine.device.programs import busy_slots

    programs = engine.compiled_programs()
    mine = programs.by_resolution[RESOLUTION]
    unet, bank = programs.params["unet"], programs.adapter_banks["unet"]
    state = busy_slots(mine.empty_bank.slots)  # on the empty bank a step skips its UNet
    rows = max(mine.row_buckets)
    calls = {"plain": (mine.steps[(k, rows)], (unet, state))}
    for (kk, r, width), program in sorted(mine.adapter_steps.items()):
        if kk == k and r == rows:
            calls[f"adapters S={width}"] = (program, (unet, bank, state))
    for program, args in calls.values():
        jax.block_until_ready(program(*args))
    device: dict[str, list[float]] = {name: [] for name in calls}
    host: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, (program, args) in calls.items():
            began = time.perf_counter()
            out = program(*args)
            host[name].append(time.perf_counter() - began)
            jax.block_until_ready(out)
            device[name].append(time.perf_counter() - began)
    result = {}
    for name, (program, _) in calls.items():
        result[name] = {
            "seconds": statistics.median(device[name]),
            "dispatch_seconds": statistics.median(host[name]),
            **figures(program),
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--k", type=int, default=4, help="steps per dispatch of the programs timed [4]")
    parser.add_argument("--loras-per-request", type=int, default=4)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    prepare_side_by_side(DEVICES)
    with tempfile.TemporaryDirectory() as folder:
        engine = JaxEngine(engine_config(Path(folder), MAX_STEPS, args.loras_per_request))
        engine.start()
        try:
            load = [Path("/proc/loadavg").read_text().split()[0]]
            result = profile(engine, args.k, args.repeats)
            load.append(Path("/proc/loadavg").read_text().split()[0])
        finally:
            engine.stop()
    plain = result["plain"]
    print(f"k={args.k}, the largest row bucket, 2 CPU devices; load average {load[0]} -> {load[1]}")
    print(
        f"{'program':<14} {'ms':>8} {'x plain':>8} {'dispatch ms':>12} "
        f"{'flops x':>8} {'bytes x':>8} {'instr':>6}"
    )
    for name, p in result.items():
        print(
            f"{name:<14} {p['seconds'] * 1e3:8.1f} {p['seconds'] / plain['seconds']:8.3f} "
            f"{p['dispatch_seconds'] * 1e3:12.2f} {p['flops'] / plain['flops']:8.3f} "
            f"{p['bytes_accessed'] / plain['bytes_accessed']:8.3f} {p['instructions']:6d}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "k": args.k,
        "loras_per_request": args.loras_per_request,
        "load_average": load,
        "programs": result,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
