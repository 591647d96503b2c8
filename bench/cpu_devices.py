"""Are the simulated CPU devices apart, as chips are, or one pool of the host's cores?

The served and in-process Poisson benchmarks run 2 CPU devices (`--xla_force_host_platform_device_count=2`)
to stand for 2 chips. A chip that finishes its step waits for the other; a CPU device that finishes lends
its cores to the other's work. Which of the two this host is decides what the queueing model
(bench/batching_model.py) should be read with: two devices, or one of their slots together.

The same program (a chain of matmuls) runs on one device alone, then on every device at once from one
thread each. "at once / alone" is the wall time of the second over the first: 1.0 where devices are apart
(each has cores of its own), the device count where they share one pool. The CPU seconds say how many
cores one device alone keeps busy. XLA_FLAGS and PJRT_NPROC are read from the environment, so a flag that
claims to give each device a core can be tried as `XLA_FLAGS="--xla_force_host_platform_device_count=2
--the_flag" .venv/bin/python bench/cpu_devices.py`.

    .venv/bin/python bench/cpu_devices.py        # table + bench/results/cpu_devices.json
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")

import argparse
import json
import resource
import statistics
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp

RESULTS = Path(__file__).parent / "results" / "cpu_devices.json"


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _chain(x: jax.Array) -> jax.Array:
    for _ in range(4):
        x = jnp.tanh(x @ x) * 0.5
    return x


def measure(size: int, calls: int, repeats: int) -> dict:
    devices = jax.devices()
    program = jax.jit(_chain)
    inputs = [jax.device_put(jnp.ones((size, size), jnp.float32), d) for d in devices]
    for x in inputs:  # compile for every device and warm up
        program(x).block_until_ready()

    def run(x: jax.Array) -> None:
        for _ in range(calls):
            program(x).block_until_ready()

    alone, alone_cpu, together = [], [], []
    for _ in range(repeats):
        began, cpu = time.perf_counter(), _cpu_seconds()
        run(inputs[0])
        alone.append(time.perf_counter() - began)
        alone_cpu.append(_cpu_seconds() - cpu)
        threads = [threading.Thread(target=run, args=(x,)) for x in inputs]
        began = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        together.append(time.perf_counter() - began)
    return {
        "devices": len(devices),
        "host_cpus": os.cpu_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "pjrt_nproc": os.environ.get("PJRT_NPROC"),
        "matmul_size": size,
        "calls": calls,
        "alone_seconds": alone,
        "alone_cores_busy": [c / w for c, w in zip(alone_cpu, alone, strict=True)],
        "at_once_seconds": together,
        "at_once_over_alone": statistics.median(together) / statistics.median(alone),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=1024, help="matmul side")
    parser.add_argument("--calls", type=int, default=6, help="program calls per device per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    result = measure(args.size, args.calls, args.repeats)
    devices = result["devices"]
    print(f"{devices} CPU devices on {result['host_cpus']} host CPUs; XLA_FLAGS={result['xla_flags']!r}")
    print(f"{'one device alone, s':<36}" + "".join(f"{s:>8.3f}" for s in result["alone_seconds"]))
    print(f"{'  cores it kept busy':<36}" + "".join(f"{c:>8.2f}" for c in result["alone_cores_busy"]))
    print(f"{'every device at once, s':<36}" + "".join(f"{s:>8.3f}" for s in result["at_once_seconds"]))
    ratio = result["at_once_over_alone"]
    print(f"{'at once / alone (median)':<36}{ratio:>8.2f}   (1.0: apart, as chips; {devices}: one pool)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
