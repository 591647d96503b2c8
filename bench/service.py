"""Service overhead and overload behaviour: gRPC versus the engine called in-process, same model and slots.

Three phases in one run:
1. in-process: a JaxEngine in this process, C requests kept in flight (closed loop), images per second;
2. gRPC: an ``sdxl-server serve`` process with the same settings, C concurrent clients (grpc.aio), images
   per second; the ratio to phase 1 is the service's efficiency (goal >= 0.95);
3. overload: requests arrive open-loop at 10x the rate phase 2 sustained; latency of the RESOURCE_EXHAUSTED
   rejections (goal p99 < 50 ms) and throughput of the accepted work meanwhile.

C = 2 x slots keeps every slot busy with a full batch waiting behind it; the queue (default 16 images)
holds at least C, so phases 1-2 see no rejection.
Phases 1 and 2 are timed ``--repeats`` times each and report the median (a tiny model on a fast device is
bound by host-side dispatch, which jitters by +-15% run to run). Prints a table and writes
bench/results/service.json.

    .venv/bin/python bench/service.py [--resolution 64x64 --steps 8 --slots-per-device 4 --requests 96]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import queue
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from sdxl_client._proto.sdxl.v1 import sdxl_pb2, sdxl_pb2_grpc
from sdxl_server.engine import EngineConfig, api
from sdxl_test_support.servers import RunningServer

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "service.json"


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def _request(args: argparse.Namespace, i: int) -> api.GenerationRequest:
    return api.GenerationRequest(
        request_id=f"bench-{i}",
        prompt=f"a lighthouse at dusk, study {i}",
        negative_prompt="",
        seed=i,
        num_images=1,
        steps=args.steps,
        guidance_scale=5.0,
        resolution=api.Resolution.parse(args.resolution),
    )


def _message(args: argparse.Namespace, i: int) -> sdxl_pb2.GenerateRequest:
    r = _request(args, i)
    return sdxl_pb2.GenerateRequest(
        prompt=r.prompt, seed=r.seed, num_images=1, steps=r.steps, guidance_scale=r.guidance_scale,
        width=r.resolution.width, height=r.resolution.height, request_id=r.request_id,
    )  # fmt: skip


# ---- phase 1: the engine in this process


def run_in_process(args: argparse.Namespace) -> dict[str, Any]:
    from sdxl_server.engine import JaxEngine
    from sdxl_server.engine.models.quiet_libraries import silence_library_noise

    silence_library_noise()
    engine = JaxEngine(_engine_config(args))
    engine.start()
    info = engine.info()
    args.concurrency = 2 * info.slots
    if args.max_queue < args.concurrency:
        raise SystemExit(f"--max-queue must be at least 2 x slots = {args.concurrency}")
    try:
        _closed_loop_in_process(engine, args, count=info.slots)  # first dispatches off the clock
        rates = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            _closed_loop_in_process(engine, args, count=args.requests)
            rates.append(args.requests / (time.perf_counter() - started))
    finally:
        engine.stop(0.0)
    return {
        "images_per_second": statistics.median(rates),
        "images_per_second_runs": rates,
        "slots": info.slots,
        "devices": info.devices,
        "device_kind": info.device_kind,
    }


def _closed_loop_in_process(engine: Any, args: argparse.Namespace, count: int) -> None:
    """Keeps ``concurrency`` requests in flight until ``count`` have finished."""
    finished: queue.Queue[api.EngineEvent] = queue.Queue()

    def listener(event: api.EngineEvent) -> None:  # engine thread: hand over, never block
        if isinstance(event, api.Finished | api.Failed):
            finished.put(event)

    submitted = done = 0
    while done < count:
        while submitted < count and submitted - done < args.concurrency:
            engine.submit(_request(args, submitted), listener)
            submitted += 1
        event = finished.get()
        if isinstance(event, api.Failed):
            raise RuntimeError(f"in-process request failed: {event.error!r}")
        done += 1


def _engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=args.model,
        resolutions=(api.Resolution.parse(args.resolution),),
        slots_per_device=args.slots_per_device,
        max_queue=args.max_queue,
        compilation_cache_dir=os.environ.get("SDXL_COMPILATION_CACHE_DIR"),
        tiny_model_dir=os.environ.get("SDXL_TINY_MODEL_DIR"),
        max_steps=max(args.steps, 50),
        default_steps=min(args.steps, 30),
    )


# ---- phases 2 and 3: through a real server process


@contextlib.contextmanager
def server_process(args: argparse.Namespace) -> Iterator[str]:
    server_args = [
        "--model", args.model, "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0",
        "--resolutions", args.resolution, "--slots-per-device", str(args.slots_per_device),
        "--max-queue", str(args.max_queue), "--max-steps", str(max(args.steps, 50)),
        "--default-steps", str(min(args.steps, 30)),
    ]  # fmt: skip
    server = RunningServer(server_args)
    try:
        server.wait_ready(timeout=900)
        yield server.target
    finally:
        server.terminate(timeout=120)


async def _grpc_closed_loop(stub: Any, args: argparse.Namespace, count: int, offset: int) -> None:
    next_index = 0

    async def client() -> None:
        nonlocal next_index
        while next_index < count:
            i = next_index
            next_index += 1
            await stub.Generate(_message(args, offset + i), timeout=600)

    await asyncio.gather(*(client() for _ in range(args.concurrency)))


async def run_grpc(target: str, args: argparse.Namespace, slots: int) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = sdxl_pb2_grpc.ImageServiceStub(channel)
        await _grpc_closed_loop(stub, args, count=slots, offset=10_000)  # off the clock, like phase 1
        rates = []
        for repeat in range(args.repeats):
            started = time.perf_counter()
            await _grpc_closed_loop(stub, args, count=args.requests, offset=repeat * args.requests)
            rates.append(args.requests / (time.perf_counter() - started))
    return {"images_per_second": statistics.median(rates), "images_per_second_runs": rates}


async def run_overload(target: str, args: argparse.Namespace, sustained_rps: float) -> dict[str, Any]:
    """Open-loop arrivals at ``overload`` x the sustained rate for ``overload_seconds``."""
    rate = args.overload * sustained_rps
    rejections: list[float] = []
    accepted: list[float] = []
    other: dict[str, int] = {}
    async with grpc.aio.insecure_channel(target) as channel:
        stub = sdxl_pb2_grpc.ImageServiceStub(channel)

        async def one(i: int) -> None:
            sent = time.perf_counter()
            try:
                await stub.Generate(_message(args, 20_000 + i), timeout=600)
                accepted.append(time.perf_counter() - sent)
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    rejections.append(time.perf_counter() - sent)
                else:
                    other[e.code().name] = other.get(e.code().name, 0) + 1

        tasks = []
        started = time.perf_counter()
        total = int(rate * args.overload_seconds)
        for i in range(total):
            delay = started + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
        seconds = time.perf_counter() - started
    return {
        "offered_requests_per_second": rate,
        "requests": total,
        "rejected": len(rejections),
        "accepted": len(accepted),
        "other_errors": other,
        "rejection_p50_ms": 1000 * _percentile(rejections, 50),
        "rejection_p99_ms": 1000 * _percentile(rejections, 99),
        "rejection_max_ms": 1000 * max(rejections, default=float("nan")),
        "accepted_images_per_second": len(accepted) / seconds,
    }


def _runs(phase: dict[str, Any]) -> str:
    return "runs " + ", ".join(f"{rate:.1f}" for rate in phase["images_per_second_runs"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--resolution", default="64x64")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--slots-per-device", type=int, default=4)
    parser.add_argument("--max-queue", type=int, default=16)
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per phase; the median is reported")
    parser.add_argument("--overload", type=float, default=10.0)
    parser.add_argument("--overload-seconds", type=float, default=5.0)
    args = parser.parse_args()

    in_process = run_in_process(args)  # sets args.concurrency = 2 x slots
    with server_process(args) as target:
        through_grpc = asyncio.run(run_grpc(target, args, in_process["slots"]))
        overload = asyncio.run(run_overload(target, args, through_grpc["images_per_second"]))
    ratio = through_grpc["images_per_second"] / in_process["images_per_second"]
    result = {
        "model": args.model,
        "resolution": args.resolution,
        "steps": args.steps,
        "slots": in_process["slots"],
        "max_queue": args.max_queue,
        "concurrency": args.concurrency,
        "requests": args.requests,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {in_process['devices']} x "
        f"{in_process['device_kind']}",
        "in_process": in_process,
        "grpc": through_grpc,
        "grpc_over_in_process": ratio,
        "overload": overload,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"model {args.model} {args.resolution}, {args.steps} steps, {result['slots']} slots")
    print(f"concurrency {args.concurrency} (2 x slots); machine {result['machine']}")
    print(f"{'measure':<40}{'value':>12}  goal")
    for label, phase in (("in-process", in_process), ("gRPC", through_grpc)):
        print(f"{label + ' images/s (median)':<40}{phase['images_per_second']:>12.2f}  {_runs(phase)}")
    print(f"{'gRPC / in-process':<40}{ratio:>12.3f}  >= 0.95")
    print(f"{'overload offered requests/s':<40}{overload['offered_requests_per_second']:>12.1f}")
    print(f"{'overload rejected / accepted':<40}{overload['rejected']:>7} / {overload['accepted']:<4}")
    print(f"{'rejection latency p50 ms':<40}{overload['rejection_p50_ms']:>12.2f}")
    print(f"{'rejection latency p99 ms':<40}{overload['rejection_p99_ms']:>12.2f}  < 50")
    print(f"{'accepted images/s under overload':<40}{overload['accepted_images_per_second']:>12.2f}")
    print(f"wrote {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
