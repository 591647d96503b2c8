"""``sdxl-server compile``: every program of a serving configuration, compiled ahead of time for a topology.

    sdxl-server compile --topology v5e:2x2 --model sdxl-base --resolutions 1024x1024 \\
        --slots-per-device 4 --json aot.json [--cache-dir DIR]

It prints a table (HBM per program and per device, FLOPs, bytes accessed, roofline time, compile time)
and, with --json, writes it as JSON (DESIGN.md: "Server commands"). A TPU topology needs libtpu (`make
tpu-aot` installs it into .venv-tpu); `--topology cpu` compiles for this host's CPU devices. With
--cache-dir the executables go into the engine's program cache, where a server of the same key (model,
dtype, resolution, buckets, attention, topology, jax and libtpu versions) loads them instead of compiling.
Exit status: 0 when the configuration fits the device memory, 1 when it does not, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from sdxl_server.engine.api import Resolution

# The serve defaults the programs' shapes depend on (server_settings.py): a different value compiles
# different programs, so a cache meant for a server must be filled with the server's values.
_DEFAULT_MAX_STEPS = 50
_ATTENTION = ("xla", "flash")


def add_compile_arguments(parser: argparse.ArgumentParser) -> None:
    from sdxl_server.engine.device.ahead_of_time import TOPOLOGIES

    parser.add_argument("--topology", required=True, choices=TOPOLOGIES, help="the slice to compile for")
    parser.add_argument(
        "--model",
        required=True,
        help="a model directory or checkpoint, tiny, demo, or an architecture name (sdxl-base: no weights)",
    )
    parser.add_argument("--model-configs", default=None, help="configs for a single-file checkpoint")
    parser.add_argument("--resolutions", required=True, help="comma-separated WIDTHxHEIGHT, as serve takes")
    parser.add_argument("--slots-per-device", type=int, required=True, help="batch slots per chip")
    parser.add_argument("--steps-per-dispatch", type=int, default=1, help="as serve's [1]")
    parser.add_argument("--max-steps", type=int, default=_DEFAULT_MAX_STEPS, help="as serve's [50]")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"), help="[auto]")
    parser.add_argument("--attention", default="xla", choices=_ATTENTION, help="[xla]")
    parser.add_argument("--max-devices", type=int, default=None, help="as serve's (the CPU topology)")
    parser.add_argument(
        "--seed-steps",
        type=int,
        default=20,
        help="also compile the seed's per-chip generate with this many steps (0: not) [20]",
    )
    parser.add_argument("--json", default=None, help="write the report here as JSON")
    parser.add_argument("--cache-dir", default=None, help="write the executables into this compilation cache")


def run_compile(args: argparse.Namespace) -> int:
    from sdxl_server.engine.models.quiet_libraries import silence_library_noise
    from sdxl_server.server_settings import parse_resolutions

    try:
        resolutions: tuple[Resolution, ...] = parse_resolutions(args.resolutions)
    except ValueError as error:
        return _refuse(f"--resolutions: {error}")
    for flag, value in (
        ("--slots-per-device", args.slots_per_device),
        ("--steps-per-dispatch", args.steps_per_dispatch),
        ("--max-steps", args.max_steps),
    ):
        if value < 1:
            return _refuse(f"{flag}: must be at least 1 (got {value})")
    if args.attention == "flash" and not _flash_available():
        return _refuse(
            "--attention flash: the flash attention kernels (engine/device/attention.py) are not in "
            "this build yet; compile with --attention xla"
        )
    from sdxl_server.engine.device.ahead_of_time import allow_libtpu_without_a_tpu

    allow_libtpu_without_a_tpu()  # before anything initialises JAX's backends
    silence_library_noise()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from sdxl_server.engine.device.ahead_of_time import (
        CPU_TOPOLOGY,
        TopologyUnavailable,
        abstract_model,
        compile_for_topology,
        describe,
        topology_devices,
    )

    platform = "cpu" if args.topology == CPU_TOPOLOGY else "tpu"
    try:
        topology_devices(args.topology, args.max_devices)  # fails fast, before the model is built
    except TopologyUnavailable as error:
        return _refuse(str(error))
    tiny_dir = os.environ.get("SDXL_TINY_MODEL_DIR")
    model = abstract_model(args.model, args.dtype, platform, args.model_configs, tiny_dir)

    def progress(program: object) -> None:
        name = getattr(program, "name", "?")
        seconds = getattr(program, "compile_seconds", 0.0)
        print(f"compiled {name} in {seconds:.1f}s", file=sys.stderr, flush=True)

    report = compile_for_topology(
        args.topology,
        model,
        args.model,
        resolutions,
        args.slots_per_device,
        args.max_steps,
        args.steps_per_dispatch,
        attention=args.attention,
        cache_dir=args.cache_dir,
        seed_steps=args.seed_steps or None,
        max_devices=args.max_devices,
        progress=progress,
    )
    print(describe(report), flush=True)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report.as_json(), indent=2) + "\n")
    if args.cache_dir:
        print(f"executables written into the program cache under {args.cache_dir}", flush=True)
    return 0 if report.fits else 1


def _flash_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("sdxl_server.engine.device.attention") is not None


def _refuse(message: str) -> int:
    sys.stderr.write(f"sdxl-server compile: error: {message}\n")
    return 2
