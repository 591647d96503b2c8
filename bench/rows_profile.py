"""Where the rows benchmark's time goes: each compiled program timed alone, and each configuration's
dispatches, decodes and admissions read from the engine's trace and priced with those times.

For each configuration of bench/rows_and_guidance.py (the same engine, model and work) it prints the
measured wall seconds beside the sum of the programs it ran (steps by (k, row bucket), decodes by batch,
inserts, rearranges, encodes) and the rest (host time not overlapped with the device), and the row
buckets the dispatches used against the rows the busy slots needed. A configuration whose priced
programs explain its wall time is bound by the device; then a ratio off its goal is the programs' own
(rows not linear in time, a bucket larger than its rows, decodes) or the packing's.

    .venv/bin/python bench/rows_profile.py [--images 16] [--repeats 5]
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
from pathlib import Path

import numpy as np

from bench.rows_and_guidance import (
    DEVICES,
    FEW_STEPS,
    GUIDANCE,
    RESOLUTION,
    STEPS,
    Kind,
    engine_config,
    run_batch,
    say,
)

RESULTS = Path(__file__).resolve().parent / "results" / "rows_profile.json"


def program_times(engine, repeats: int) -> dict[str, float]:
    """Median seconds of each step and decode program of the bench resolution, timed round-robin (one
    call of each per repeat, after one untimed call each) so that the shared machine's drift reaches
    them all alike. The programs run on the engine's empty bank: a step's cost is its row bucket's,
    whatever the slots hold."""
    import jax
    from sdxl_server.engine.device.programs import busy_slots

    programs = engine.compiled_programs()
    mine = programs.by_resolution[RESOLUTION]
    unet, vae = programs.params["unet"], programs.params["vae"]
    state, held = busy_slots(mine.empty_bank.slots), mine.empty_bank.held
    calls = {
        f"step k={k} rows={rows}": (lambda s=step: s(unet, state)) for (k, rows), step in mine.steps.items()
    }
    calls.update(
        {f"decode batch={b}": (lambda d=d: d(vae, held, np.int32(0))) for b, d in mine.decode.items()}
    )
    for call in calls.values():
        jax.block_until_ready(call())
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            began = time.perf_counter()
            jax.block_until_ready(call())
            times[name].append(time.perf_counter() - began)
    return {name: statistics.median(values) for name, values in sorted(times.items())}


def priced(trace, times: dict[str, float]) -> dict:
    """Counts of each program in `trace` and their summed seconds from `times`."""
    counts: collections.Counter[str] = collections.Counter()
    needed_rows: collections.Counter[str] = collections.Counter()
    for event in trace:
        kind = event.kind.value if hasattr(event.kind, "value") else str(event.kind)
        if kind == "step":
            k = int(re.search(r"k=(\d+)", event.detail).group(1))
            bucket = int(re.search(r"batch=[^:]+:(\d+)", event.detail).group(1))
            rows = int(re.search(r"rows=(\d+)", event.detail).group(1))
            counts[f"step k={k} rows={bucket}"] += 1
            needed_rows[f"bucket {bucket}: busy rows (both devices) {rows}"] += 1
        elif kind == "decode":
            bucket = int(re.search(r"batch=(\d+)", event.detail).group(1))
            counts[f"decode batch={bucket}"] += 1
        else:
            counts[kind] += 1
    seconds = sum(times.get(name, 0.0) * count for name, count in counts.items())
    return {"counts": dict(counts), "priced_seconds": seconds, "needed_rows": dict(needed_rows)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from sdxl_server.engine import JaxEngine
    from sdxl_server.service.request_conversion import default_spacing

    from bench.bench_model import prepare_side_by_side

    prepare_side_by_side(DEVICES)
    engine = JaxEngine(engine_config())
    engine.start()
    limits = engine.limits()
    few_sampler = "lcm" if "lcm" in limits.samplers else "euler"
    few_spacing = default_spacing(few_sampler, limits)
    n = args.images
    few = Kind("few-step", FEW_STEPS, 0.0, sampler=few_sampler, spacing=few_spacing)
    kinds = {
        "guided": [Kind("guided", STEPS, GUIDANCE)] * n,
        "unguided": [Kind("unguided", STEPS, 0.0)] * n,
        "interval": [Kind("interval", STEPS, GUIDANCE, (0.0, 0.4))] * n,
        "few-step": [few] * n,
        "mix": [few if i % 2 == 0 else Kind("guided", STEPS, GUIDANCE) for i in range(n)],
    }
    run_batch(engine, kinds["mix"][:4])  # warm
    times = program_times(engine, args.repeats)
    for name, seconds in times.items():
        say(f"{name}: {seconds * 1000:.1f} ms")
    report = {"program_seconds": times, "configurations": {}}
    for name, work in kinds.items():
        before = len(engine.trace())
        result = run_batch(engine, work)
        trace = engine.trace()[before:]
        cost = priced(trace, times)
        for field in ("wall_seconds", "device_seconds", "cpu_seconds", "steps", "row_steps_per_device"):
            cost[field] = result[field]
        report["configurations"][name] = cost
        say(
            f"{name}: wall {result['wall_seconds']:.2f} s, CPU {result['cpu_seconds']:.2f} s, "
            f"programs priced {cost['priced_seconds']:.2f} s; "
            f"{json.dumps(cost['counts'])}"
        )
        say(f"    {json.dumps(cost['needed_rows'])}")
    engine.stop()
    load = Path("/proc/loadavg").read_text().split()[:3]
    report["load_average"] = load
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    say(f"load average {' '.join(load)}; wrote {RESULTS}")


if __name__ == "__main__":
    main()
