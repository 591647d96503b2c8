"""``sdxl-server compile``: every program of a serving configuration, compiled ahead of time for a topology.

    sdxl-server compile --topology v5e:2x2 --model sdxl-base --resolutions 1024x1024 \\
        --slots-per-device 4 --json aot.json [--cache-dir DIR]

It prints a table (HBM per program and per device, FLOPs, bytes accessed, roofline time, compile time)
and, with --json, writes it as JSON (DESIGN.md: "Server commands"). A TPU topology needs libtpu (`make
tpu-aot` installs it into .venv-tpu); `--topology cpu` compiles for this host's CPU devices. With
--cache-dir the executables go into the engine's program cache, where a server of the same key (model,
dtype, resolution, buckets, attention, topology, jax and libtpu versions) loads them instead of compiling.
Exit status: 0 when the configuration fits the device memory, 1 when it does not, 2 for bad arguments.

The flags that shape programs default to serve's environment variables (SDXL_MODEL, SDXL_RESOLUTIONS,
SDXL_SLOTS_PER_DEVICE, ...): the chart's compile Job reads the servers' ConfigMap, so that it compiles
exactly what the pods will look up.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sdxl_server.engine.api import Resolution

# The serve defaults the programs' shapes depend on (server_settings.py): a different value compiles
# different programs, so a cache meant for a server must be filled with the server's values.
_DEFAULT_MAX_STEPS = 50
_ATTENTION = ("xla", "flash", "auto")
_DTYPES = ("auto", "float32", "bfloat16")


# The memory plan's probe programs (memory_plan.py names them): all `--fit-check` compiles.
_MEMORY_PROBES = "^memory-probe-"


def add_compile_arguments(parser: argparse.ArgumentParser, env: Mapping[str, str] | None = None) -> None:
    from sdxl_server.engine.device.ahead_of_time import TOPOLOGIES

    env = os.environ if env is None else env

    def serve_default(name: str, fallback: str | None = None) -> dict[str, Any]:
        value = env.get(f"SDXL_{name}", fallback)
        return {"default": value} if value is not None else {"required": True}

    parser.add_argument("--topology", required=True, choices=TOPOLOGIES, help="the slice to compile for")
    parser.add_argument(
        "--model",
        **serve_default("MODEL"),
        help="a model directory or checkpoint, tiny, demo, or an architecture name (sdxl-base: no weights) "
        "[$SDXL_MODEL]",
    )
    parser.add_argument(
        "--model-configs", **serve_default("MODEL_CONFIGS", ""), help="configs for a single-file checkpoint"
    )
    parser.add_argument(
        "--resolutions",
        **serve_default("RESOLUTIONS"),
        help="comma-separated WIDTHxHEIGHT [$SDXL_RESOLUTIONS]",
    )
    parser.add_argument(
        "--slots-per-device",
        **serve_default("SLOTS_PER_DEVICE"),
        help="batch slots per chip, or auto: the most the memory plan fits [$SDXL_SLOTS_PER_DEVICE]",
    )
    parser.add_argument(
        "--max-decode-batch",
        **serve_default("MAX_DECODE_BATCH", "auto"),
        help="images per VAE decode call per chip, or auto: the most that fit [auto]",
    )
    parser.add_argument(
        "--memory-fraction",
        **serve_default("MEMORY_FRACTION", "0.9"),
        help="share of the chip's HBM the memory plan may fill, as serve's [0.9]",
    )
    parser.add_argument(
        "--steps-per-dispatch", **serve_default("STEPS_PER_DISPATCH", "1"), help="as serve's [1]"
    )
    parser.add_argument(
        "--max-steps", **serve_default("MAX_STEPS", str(_DEFAULT_MAX_STEPS)), help="as serve's [50]"
    )
    parser.add_argument("--dtype", **serve_default("DTYPE", "auto"), choices=_DTYPES, help="[auto]")
    parser.add_argument(
        "--attention",
        **serve_default("ATTENTION", "auto"),
        choices=_ATTENTION,
        help="as serve's: xla, flash, or auto (the platform's default) [auto]",
    )
    parser.add_argument(
        "--max-devices", **serve_default("MAX_DEVICES", ""), help="as serve's (the CPU topology)"
    )
    parser.add_argument(
        "--engine-per-device",
        action="store_const",
        const="1",
        default=env.get("SDXL_ENGINE_PER_DEVICE", "0"),
        help="as serve's: each chip's programs apart, for its own engine (N compiles) "
        "[$SDXL_ENGINE_PER_DEVICE, else off]",
    )
    from sdxl_server.engine.settings import EngineConfig

    # A server with --lora-dir also runs step programs that take the adapter bank: they are compiled
    # when the bank has places, by default exactly when the servers' ConfigMap names a folder. Only the
    # bank's size shapes them; no adapter file is read here.
    with_adapters = bool(env.get("SDXL_LORA_DIR"))
    parser.add_argument(
        "--lora-places",
        default=env.get("SDXL_LORA_PLACES", str(EngineConfig.lora_places)) if with_adapters else "0",
        help="also compile the per-request LoRA adapter bank's programs for this many places, as serve "
        "--lora-dir with --lora-places; 0: none [$SDXL_LORA_PLACES when $SDXL_LORA_DIR is set, else 0]",
    )
    parser.add_argument(
        "--lora-max-rank",
        **serve_default("LORA_MAX_RANK", str(EngineConfig.lora_max_rank)),
        help=f"as serve's [{EngineConfig.lora_max_rank}]",
    )
    parser.add_argument(
        "--max-loras-per-request",
        **serve_default("MAX_LORAS_PER_REQUEST", str(EngineConfig.max_loras_per_request)),
        help=f"as serve's [{EngineConfig.max_loras_per_request}]",
    )
    parser.add_argument(
        "--seed-steps",
        type=int,
        default=20,
        help="also compile the seed's per-chip generate with this many steps (0: not) [20]",
    )
    parser.add_argument(
        "--seed-images",
        type=int,
        default=None,
        help="images per chip of the seed's program [slots per device]",
    )
    parser.add_argument(
        "--programs",
        default=None,
        help="compile only the programs whose name matches this regular expression (a partial report, "
        "for measuring; nothing the server could start from)",
    )
    parser.add_argument(
        "--fit-check",
        action="store_true",
        help="run only the memory plan a pod runs at start, against the chip's memory: exit 0 when the "
        "settings fit, 1 with the pod's one-line refusal when not (the chart's pre-install hook); with "
        "--cache-dir the plan's figures are read from and recorded in the cache, so a second check compiles "
        "nothing",
    )
    parser.add_argument("--json", default=None, help="write the report here as JSON")
    parser.add_argument("--cache-dir", default=None, help="write the executables into this compilation cache")


def run_compile(args: argparse.Namespace) -> int:
    from sdxl_server.engine.models.quiet_libraries import silence_library_noise
    from sdxl_server.request_rules import servable_resolutions_problem
    from sdxl_server.server_settings import parse_resolutions

    try:
        resolutions: tuple[Resolution, ...] = parse_resolutions(args.resolutions)
    except ValueError as error:
        return _refuse(f"--resolutions: {error}")
    problem = servable_resolutions_problem(resolutions)  # serve's own rule
    if problem:
        return _refuse(f"--resolutions: {problem}")
    if args.fit_check:
        if args.programs:
            return _refuse("--fit-check and --programs: the check compiles only the memory plan's probes")
        # The probes are the plan's own programs: a pod started from this cache finds their figures there.
        args.programs, args.seed_steps = _MEMORY_PROBES, 0
    elif args.cache_dir and args.programs:
        return _refuse(
            "--programs and --cache-dir: a partial cache would leave the server compiling the rest"
        )
    from sdxl_server.engine.settings import parse_count_or_auto

    numbers = {}
    for flag in ("lora_places", "lora_max_rank", "max_loras_per_request"):
        text = str(getattr(args, flag))
        least = 1 if flag == "lora_max_rank" else 0
        if not text.isdigit() or int(text) < least:
            return _refuse(f"--{flag.replace('_', '-')}: must be a whole number >= {least} (got {text!r})")
        setattr(args, flag, int(text))
    for flag in ("slots_per_device", "max_decode_batch", "steps_per_dispatch", "max_steps", "max_devices"):
        text = str(getattr(args, flag))
        if flag == "max_devices" and not text:
            continue
        if flag in ("slots_per_device", "max_decode_batch"):  # serve's parser: a count or auto
            try:
                numbers[flag] = parse_count_or_auto(text)
            except ValueError as error:
                return _refuse(f"--{flag.replace('_', '-')}: {error}")
            if numbers[flag] == 0:
                return _refuse(f"--{flag.replace('_', '-')}: must be at least 1, or auto")
            continue
        if not text.isdigit() or int(text) < 1:
            return _refuse(f"--{flag.replace('_', '-')}: must be a whole number >= 1 (got {text!r})")
        numbers[flag] = int(text)
    try:
        args.memory_fraction = float(args.memory_fraction)
    except ValueError:
        return _refuse(f"--memory-fraction: {args.memory_fraction!r} is not a number")
    if not 0 < args.memory_fraction <= 1:
        return _refuse("--memory-fraction: must be within (0, 1]")
    args.slots_per_device, args.steps_per_dispatch = (
        numbers["slots_per_device"],
        numbers["steps_per_dispatch"],
    )
    args.max_decode_batch = numbers["max_decode_batch"]
    args.max_steps, args.max_devices = numbers["max_steps"], numbers.get("max_devices")
    args.model_configs = args.model_configs or None
    from sdxl_server.server_settings import parse_boolean

    try:
        args.engine_per_device = parse_boolean(args.engine_per_device)
    except ValueError as error:
        return _refuse(f"--engine-per-device ($SDXL_ENGINE_PER_DEVICE): {error}")
    from sdxl_server.engine.device.ahead_of_time import allow_libtpu_without_a_tpu

    allow_libtpu_without_a_tpu()  # before anything initialises JAX's backends
    silence_library_noise()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from sdxl_server.engine.device.ahead_of_time import (
        CPU_TOPOLOGY,
        ProgramReport,
        TopologyUnavailable,
        abstract_model,
        describe,
        topology_devices,
    )
    from sdxl_server.engine.device.attention import default_attention

    platform = "cpu" if args.topology == CPU_TOPOLOGY else "tpu"
    attention = default_attention(platform) if args.attention == "auto" else args.attention
    try:
        topology_devices(args.topology, args.max_devices)  # fails fast, before the model is built
    except TopologyUnavailable as error:
        return _refuse(str(error))
    tiny_dir = os.environ.get("SDXL_TINY_MODEL_DIR")
    model = abstract_model(args.model, args.dtype, platform, args.model_configs, tiny_dir)

    def progress(program: ProgramReport) -> None:
        # The whole row as JSON as soon as it exists: a real SDXL takes minutes per program here.
        print(f"compiled {json.dumps(dataclasses.asdict(program))}", file=sys.stderr, flush=True)

    from sdxl_server.engine.device.memory_plan import MemoryPlanError

    # An engine per device compiles each chip's programs apart: a program is bound to its chip.
    first_devices = [0]
    if args.engine_per_device:
        first_devices = list(range(len(topology_devices(args.topology, args.max_devices)[0])))
    try:
        reports = [
            _compile(args, model, resolutions, attention, progress, first_device, args.engine_per_device)
            for first_device in first_devices
        ]
    except MemoryPlanError as error:  # what a pod would refuse at start, in its one line
        sys.stderr.write(f"sdxl-server compile: --{error.field.replace('_', '-')}: {error.message}\n")
        return 1
    if args.fit_check:
        print(f"fits: {reports[0].memory_plan}", flush=True)
        return 0
    for first_device, report in zip(first_devices, reports, strict=True):
        heading = f"engine of device {first_device}: " if args.engine_per_device else ""
        print(heading + describe(report), flush=True)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        written = [r.as_json() for r in reports]
        path.write_text(
            json.dumps({"engines": written} if args.engine_per_device else written[0], indent=2) + "\n"
        )
    if args.cache_dir:
        print(f"executables written into the program cache under {args.cache_dir}", flush=True)
    return 0 if all(report.fits for report in reports) else 1


def _compile(
    args: argparse.Namespace,
    model: Any,
    resolutions: tuple[Resolution, ...],
    attention: str,
    progress: Any,
    first_device: int,
    per_device: bool,
) -> Any:
    from sdxl_server.engine.device.ahead_of_time import compile_for_topology

    return compile_for_topology(
        args.topology,
        model,
        args.model,
        resolutions,
        args.slots_per_device,
        args.max_steps,
        args.steps_per_dispatch,
        attention=attention,
        cache_dir=args.cache_dir,
        seed_steps=args.seed_steps or None,
        max_devices=1 if per_device else args.max_devices,
        first_device=first_device,
        progress=progress,
        programs=args.programs,
        seed_images=args.seed_images,
        max_decode_batch=args.max_decode_batch,
        memory_fraction=args.memory_fraction,
        lora_places=args.lora_places,
        lora_max_rank=args.lora_max_rank,
        loras_per_request=args.max_loras_per_request,
    )


def _refuse(message: str) -> int:
    sys.stderr.write(f"sdxl-server compile: error: {message}\n")
    return 2
