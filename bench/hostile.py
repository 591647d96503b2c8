"""Long hostile runs against a real ``sdxl-server serve --model tiny`` (issue 10): too slow for tests.

Phases (each against a fresh server process with a bearer token):
1. overload: the sustained rate is measured closed-loop (2 callers), then requests arrive open-loop at
   ``--overload-factor`` (10) times that rate for ``--overload-seconds`` (60). Reported: every outcome
   by status, latency percentiles of the rejections and of the served requests, the RetryInfo delays
   the rejections suggested against how long served requests really took, health-check latency while
   overloaded, and whether any accepted request was lost (accepted = not rejected; lost = accepted but
   not OK).
2. soak: ``--soak-seconds`` (600) of steady mixed traffic, valid requests plus every hostile kind the
   tests/hostile suite sends (undecodable bodies, calls without a token, oversize bodies, fuzzed fields,
   cancelled streams, idle /metrics connections); RSS, open file descriptors and threads of the server
   sampled every ``--sample-seconds``. INTERNAL or UNKNOWN anywhere is a failure.
3. sigterm: ``--sigterm-runs`` shutdowns under load from 8 callers, once with raw calls sent back to back
   (no client backoff) and once with the client library (retries with the server's RetryInfo): how the
   calls that were in flight or arrived after SIGTERM ended (UNAVAILABLE is right, CANCELLED is not).

Prints a table, writes bench/results/hostile.json and bench/results/hostile.png (RSS and fds over time).

    nice -n 10 .venv/bin/python bench/hostile.py [--overload-seconds 60 --soak-seconds 600]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sdxl_client import Client, SdxlError
from sdxl_client._proto.sdxl.v1 import sdxl_pb2, sdxl_pb2_grpc
from sdxl_test_support.servers import RunningServer

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
TOKEN = "bench-hostile-token"
GENERATE = "/sdxl.v1.ImageService/Generate"
METADATA = (("authorization", f"Bearer {TOKEN}"),)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


class Server(RunningServer):
    """One ``sdxl-server serve`` process with free ports and a token file, serving once constructed."""

    def __init__(self, extra: list[str], workdir: Path) -> None:
        token_file = workdir / "token"
        token_file.write_text(TOKEN)
        args = [
            "--model", "tiny", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0",
            "--resolutions", "64x64", "--max-steps", "20", "--default-steps", "4",
            "--auth-token-file", str(token_file), *extra,
        ]  # fmt: skip
        super().__init__(args)
        self.wait_ready()

    @property
    def lines(self) -> list[str]:
        return self.output().splitlines()

    def sample(self) -> dict[str, float]:
        pid = self.process.pid
        status = Path(f"/proc/{pid}/status").read_text()
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        return {
            "rss_mb": int(fields["VmRSS"].split()[0]) / 1024,
            "threads": int(fields["Threads"]),
            "fds": len(os.listdir(f"/proc/{pid}/fd")),
        }

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(120)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def _outcome(error: grpc.RpcError | None) -> str:
    return "OK" if error is None else error.code().name


def _retry_delay(error: grpc.aio.AioRpcError) -> float | None:
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info.retry_delay.seconds + info.retry_delay.nanos / 1e9
    return None


# ---- phase 1: open-loop overload


async def _overload(server: Server, args: argparse.Namespace) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = sdxl_pb2_grpc.ImageServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        request = sdxl_pb2.GenerateRequest(prompt="overload", steps=args.steps)

        async def closed_loop_worker(until: float, served: list[float]) -> None:
            while time.monotonic() < until:
                started = time.monotonic()
                await stub.Generate(request, metadata=METADATA, timeout=120)
                served.append(time.monotonic() - started)

        until = time.monotonic() + args.calibrate_seconds
        calibration: list[float] = []
        await asyncio.gather(*(closed_loop_worker(until, calibration) for _ in range(2)))
        sustained = len(calibration) / args.calibrate_seconds
        rate = sustained * args.overload_factor

        outcomes: collections.Counter[str] = collections.Counter()
        latencies: dict[str, list[float]] = collections.defaultdict(list)
        suggested: list[float] = []
        health_latency: list[float] = []
        pending: set[asyncio.Task[None]] = set()

        async def one() -> None:
            started = time.monotonic()
            try:
                await stub.Generate(request, metadata=METADATA, timeout=120)
                code = "OK"
            except grpc.aio.AioRpcError as e:
                code = e.code().name
                if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    delay = _retry_delay(e)
                    if delay is not None:
                        suggested.append(delay)
            outcomes[code] += 1
            latencies[code].append(time.monotonic() - started)

        async def watch_health(until: float) -> None:
            while time.monotonic() < until:
                started = time.monotonic()
                await health.Check(health_pb2.HealthCheckRequest(), timeout=30)
                health_latency.append(time.monotonic() - started)
                await asyncio.sleep(0.5)

        start = time.monotonic()
        until = start + args.overload_seconds
        watcher = asyncio.create_task(watch_health(until))
        sent = 0
        while (now := time.monotonic()) < until:
            due = start + sent / rate
            if due > now:
                await asyncio.sleep(due - now)
            task = asyncio.create_task(one())
            pending.add(task)
            task.add_done_callback(pending.discard)
            sent += 1
        await watcher
        await asyncio.gather(*pending)
    rejected = outcomes["RESOURCE_EXHAUSTED"] + outcomes["DEADLINE_EXCEEDED"] + outcomes["UNAVAILABLE"]
    accepted = sent - rejected
    served = latencies["OK"]
    return {
        "sustained_per_second": sustained,
        "offered_per_second": rate,
        "sent": sent,
        "outcomes": dict(outcomes),
        "accepted": accepted,
        "lost": accepted - outcomes["OK"],
        "rejection_ms": {f"p{q}": 1000 * _percentile(latencies["RESOURCE_EXHAUSTED"], q) for q in (50, 99)},
        "served_s": {f"p{q}": _percentile(served, q) for q in (50, 99)},
        "suggested_retry_s": {f"p{q}": _percentile(suggested, q) for q in (50, 99)},
        "health_ms": {
            "p50": 1000 * _percentile(health_latency, 50),
            "max": 1000 * max(health_latency, default=float("nan")),
        },
    }


# ---- phase 2: soak with hostile traffic


def _soak(server: Server, args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(10)
    outcomes: collections.Counter[str] = collections.Counter()
    samples: list[dict[str, float]] = []
    valid = sdxl_pb2.GenerateRequest(prompt="soak", steps=2)
    hostile_bodies = [
        bytes.fromhex("0a02fffe"),
        b"\x28" + b"\xff" * 11,
        valid.SerializeToString()[:-3],
    ]
    start = time.monotonic()
    until = start + args.soak_seconds
    next_sample = start
    idle_sockets: list[socket.socket] = []
    with grpc.insecure_channel(server.target) as channel:
        raw = channel.unary_unary(GENERATE)
        stub = sdxl_pb2_grpc.ImageServiceStub(channel)
        while (now := time.monotonic()) < until:
            if now >= next_sample:
                samples.append({"t": now - start, **server.sample()})
                next_sample += args.sample_seconds
            kind = rng.choice(
                ["valid", "valid", "undecodable", "no_token", "oversize", "fuzzed", "cancel", "idle"]
            )
            try:
                if kind == "valid":
                    stub.Generate(valid, metadata=METADATA, timeout=60)
                elif kind == "undecodable":
                    raw(rng.choice(hostile_bodies), metadata=METADATA, timeout=60)
                elif kind == "no_token":
                    raw(rng.choice(hostile_bodies), timeout=60)
                elif kind == "oversize":
                    raw(b"\x0a\x80\x80\x80\x01" + b"a" * (2 << 20), metadata=METADATA, timeout=60)
                elif kind == "fuzzed":
                    fuzzed = sdxl_pb2.GenerateRequest(
                        prompt="".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(rng.randrange(0, 300))),
                        steps=rng.choice([0, 1, 3, 21, 2**31]),
                        num_images=rng.choice([0, 1, 9]),
                        width=rng.choice([0, 64, 65]),
                        height=rng.choice([0, 64]),
                        guidance_scale=rng.choice([0.0, 5.0, -1.0, float("nan")]),
                        request_id="x" * rng.choice([0, 8, 200]),
                    )
                    stub.Generate(fuzzed, metadata=METADATA, timeout=60)
                elif kind == "cancel":
                    stream = stub.GenerateStream(valid, metadata=METADATA, timeout=60)
                    next(stream)
                    stream.cancel()
                    kind = "cancelled"
                else:  # an idle /metrics connection, closed later (the server evicts old ones)
                    idle_sockets.append(socket.create_connection(("127.0.0.1", server.metrics_port)))
                    if len(idle_sockets) > 64:
                        idle_sockets.pop(0).close()
                outcomes[f"{kind}:OK"] += 1
            except grpc.RpcError as e:
                outcomes[f"{kind}:{e.code().name}"] += 1
    for s in idle_sockets:
        s.close()
    samples.append({"t": time.monotonic() - start, **server.sample()})
    first, last = samples[0], samples[-1]
    # Growth from the first full minute (warm caches) to the end.
    settled = next((s for s in samples if s["t"] >= 60), first)
    return {
        "seconds": args.soak_seconds,
        "calls": sum(outcomes.values()),
        "outcomes": dict(outcomes),
        "internal_or_unknown": sum(v for k, v in outcomes.items() if k.endswith(("INTERNAL", "UNKNOWN"))),
        "rss_mb": {"start": first["rss_mb"], "after_1_min": settled["rss_mb"], "end": last["rss_mb"],
                   "max": max(s["rss_mb"] for s in samples)},
        "rss_growth_after_1_min_pct": 100 * (last["rss_mb"] / settled["rss_mb"] - 1),
        "fds": {"start": first["fds"], "end": last["fds"], "max": max(s["fds"] for s in samples)},
        "threads": {"start": first["threads"], "end": last["threads"],
                    "max": max(s["threads"] for s in samples)},
        "samples": samples,
    }  # fmt: skip


# ---- phase 3: SIGTERM under load


def _sigterm_run(args: argparse.Namespace, workdir: Path, with_client: bool) -> dict[str, int]:
    server = Server(["--drain-seconds", "30"], workdir)
    after: collections.Counter[str] = collections.Counter()
    stop, signalled = threading.Event(), threading.Event()

    def raw_caller() -> None:
        with grpc.insecure_channel(server.target) as channel:
            stub = sdxl_pb2_grpc.ImageServiceStub(channel)
            while not stop.is_set():
                try:
                    stub.Generate(
                        sdxl_pb2.GenerateRequest(prompt="x", steps=1), metadata=METADATA, timeout=30
                    )
                    code = "OK"
                except grpc.RpcError as e:
                    code = e.code().name
                if signalled.is_set():
                    after[code] += 1

    def client_caller() -> None:
        with Client(server.target, token=TOKEN, timeout=30) as client:
            while not stop.is_set():
                try:
                    client.generate("x", steps=1)
                    code = "OK"
                except SdxlError as e:
                    code = e.code.name
                if signalled.is_set():
                    after[code] += 1

    callers = [threading.Thread(target=client_caller if with_client else raw_caller) for _ in range(8)]
    for caller in callers:
        caller.start()
    time.sleep(2.0)
    signalled.set()
    server.process.send_signal(signal.SIGTERM)
    server.process.wait(120)
    time.sleep(0.5)
    stop.set()
    for caller in callers:
        caller.join(60)
    return dict(after)


def _sigterm(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name, with_client in (("raw_back_to_back", False), ("client_library", True)):
        runs = [_sigterm_run(args, workdir, with_client) for _ in range(args.sigterm_runs)]
        results[name] = {"runs": runs, "cancelled": sum(r.get("CANCELLED", 0) for r in runs)}
    return results


def _plot(soak: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t"] / 60 for s in soak["samples"]]
    fig, left = plt.subplots(figsize=(8, 4))
    left.plot(t, [s["rss_mb"] for s in soak["samples"]], color="tab:blue", label="RSS (MB)")
    left.set_xlabel("minutes of hostile soak")
    left.set_ylabel("RSS (MB)", color="tab:blue")
    left.set_ylim(bottom=0)
    right = left.twinx()
    right.plot(t, [s["fds"] for s in soak["samples"]], color="tab:orange", label="open fds")
    right.plot(t, [s["threads"] for s in soak["samples"]], color="tab:green", label="threads")
    right.set_ylabel("fds, threads")
    right.set_ylim(bottom=0)
    fig.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--max-queue", type=int, default=8)
    parser.add_argument("--calibrate-seconds", type=float, default=10.0)
    parser.add_argument("--overload-seconds", type=float, default=60.0)
    parser.add_argument("--overload-factor", type=float, default=10.0)
    parser.add_argument("--soak-seconds", type=float, default=600.0)
    parser.add_argument("--sample-seconds", type=float, default=10.0)
    parser.add_argument("--sigterm-runs", type=int, default=3)
    parser.add_argument("--phases", default="overload,soak,sigterm")
    args = parser.parse_args()
    phases = set(args.phases.split(","))
    RESULTS.mkdir(parents=True, exist_ok=True)
    workdir = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-hostile-{os.getpid()}"
    workdir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_avg_at_start": os.getloadavg()},
        "args": vars(args),
    }  # fmt: skip
    server_args = ["--slots-per-device", "1", "--max-queue", str(args.max_queue)]
    if "overload" in phases:
        server = Server(server_args, workdir)
        try:
            result["overload"] = asyncio.run(_overload(server, args))
            result["overload"]["server_after"] = server.sample()
        finally:
            result["overload"]["exit_code"] = server.stop()
    if "soak" in phases:
        server = Server(server_args, workdir)
        try:
            result["soak"] = _soak(server, args)
        finally:
            result["soak"]["exit_code"] = server.stop()
            tracebacks = sum("Traceback" in line for line in server.lines)
            result["soak"]["log_tracebacks"] = tracebacks
        _plot(result["soak"], RESULTS / "hostile.png")
    if "sigterm" in phases:
        result["sigterm"] = _sigterm(args, workdir)
    (RESULTS / "hostile.json").write_text(json.dumps(result, indent=2) + "\n")
    _print_table(result)
    return 0


def _print_table(result: dict[str, Any]) -> None:
    rows: list[tuple[str, str]] = []
    if o := result.get("overload"):
        rows += [
            ("overload: sustained / offered per s",
             f"{o['sustained_per_second']:.1f} / {o['offered_per_second']:.1f}"),
            ("overload: outcomes", json.dumps(o["outcomes"])),
            ("overload: accepted / lost", f"{o['accepted']} / {o['lost']}"),
            ("overload: rejection p50 / p99 ms",
             f"{o['rejection_ms']['p50']:.1f} / {o['rejection_ms']['p99']:.1f}"),
            ("overload: served p50 / p99 s", f"{o['served_s']['p50']:.2f} / {o['served_s']['p99']:.2f}"),
            ("overload: RetryInfo p50 / p99 s",
             f"{o['suggested_retry_s']['p50']:.2f} / {o['suggested_retry_s']['p99']:.2f}"),
            ("overload: health p50 / max ms", f"{o['health_ms']['p50']:.1f} / {o['health_ms']['max']:.1f}"),
        ]  # fmt: skip
    if s := result.get("soak"):
        rows += [
            ("soak: seconds / calls", f"{s['seconds']:.0f} / {s['calls']}"),
            ("soak: INTERNAL or UNKNOWN / tracebacks", f"{s['internal_or_unknown']} / {s['log_tracebacks']}"),
            ("soak: RSS MB start / 1 min / end / max",
             "{start:.0f} / {after_1_min:.0f} / {end:.0f} / {max:.0f}".format(**s["rss_mb"])),
            ("soak: RSS growth after 1 min", f"{s['rss_growth_after_1_min_pct']:+.1f}%"),
            ("soak: fds start / end / max", "{start} / {end} / {max}".format(**s["fds"])),
            ("soak: threads start / end / max", "{start} / {end} / {max}".format(**s["threads"])),
        ]  # fmt: skip
    if t := result.get("sigterm"):
        for name, r in t.items():
            rows.append(
                (f"sigterm ({name}): CANCELLED over runs", f"{r['cancelled']}  {json.dumps(r['runs'])}")
            )
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    sys.exit(main())
