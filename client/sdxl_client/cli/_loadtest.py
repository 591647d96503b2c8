"""`sdxl loadtest`: drive a server with many requests and report throughput and latency.

Two ways to offer load. Closed loop (``--concurrency N``): N workers each send their next request as soon
as the previous one is answered, so the offered load adapts to the server (measures capacity). Open loop
(``--rate R``): requests arrive as a Poisson process at R per second regardless of answers, the way
independent users arrive (measures latency under a given load, and shows overload: queues grow and the
server rejects with RESOURCE_EXHAUSTED). Each request draws its size and steps from ``--mix``.
Retries are off by default so that every rejection is counted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from sdxl_client._errors import SdxlError
from sdxl_client._requests import new_request_id
from sdxl_client.aio import AsyncClient
from sdxl_client.cli._connection import make_async_client
from sdxl_client.cli._loadstats import Sample, format_summary, samples_as_dicts, summarize


@dataclass(frozen=True)
class MixEntry:
    """One kind of request in the mix, drawn with probability proportional to ``weight``."""

    width: int
    height: int
    steps: int
    weight: float

    def __str__(self) -> str:
        return f"{self.width}x{self.height}:{self.steps}:{self.weight:g}"


def parse_mix(text: str) -> list[MixEntry]:
    """Parses ``SIZE[:STEPS[:WEIGHT]],...``, e.g. ``64x64:4,96x64:8:2``; ``default`` is the server's size."""
    entries = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        parts = item.split(":")
        try:
            if len(parts) > 3:
                raise ValueError
            size, steps, weight = parts[0], (parts[1:2] or ["0"])[0], (parts[2:3] or ["1"])[0]
            width, height = (0, 0) if size == "default" else (int(v) for v in size.lower().split("x"))
            entry = MixEntry(width, height, int(steps), float(weight))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"mix entry must look like 64x64:4[:weight], got {item!r}"
            ) from None
        if entry.weight <= 0 or entry.steps < 0:
            raise argparse.ArgumentTypeError(f"mix entry {item!r}: weight must be > 0 and steps >= 0")
        entries.append(entry)
    if not entries:
        raise argparse.ArgumentTypeError("the mix is empty")
    return entries


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "loadtest",
        help="measure throughput and latency under load",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    load = parser.add_mutually_exclusive_group()
    load.add_argument(
        "--concurrency", type=int, default=None, help="closed loop: requests in flight (default 4)"
    )
    load.add_argument("--rate", type=float, default=None, help="open loop: Poisson arrivals per second")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds to send requests (default 30)")
    parser.add_argument(
        "--mix",
        type=parse_mix,
        default=parse_mix("default:0"),
        help="SIZE[:STEPS[:WEIGHT]],... (default: server's)",
    )
    parser.add_argument("--num-images", type=int, default=1, help="images per request")
    parser.add_argument(
        "--prompt", default="a photograph of an astronaut riding a horse", help="prompt of every request"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the mix and arrival draws (and of the images)"
    )
    parser.add_argument("--output", type=pathlib.Path, default=None, help="write the JSON report here")
    parser.add_argument(
        "--plot", type=pathlib.Path, default=None, help="write a PNG plot here (needs matplotlib)"
    )
    parser.set_defaults(run=run)
    return parser


async def run_load(
    client: AsyncClient,
    *,
    mix: list[MixEntry],
    duration: float,
    concurrency: int | None,
    rate: float | None,
    num_images: int,
    prompt: str,
    seed: int,
    clock: Callable[[], float] = time.monotonic,
) -> list[Sample]:
    """Sends requests for ``duration`` seconds (closed loop, or open loop when ``rate`` is given) and
    waits for every answer.

    Returns:
        One sample per request sent, in order of completion.
    """
    rng = random.Random(seed)
    samples: list[Sample] = []
    started = clock()
    stop_at = started + duration

    async def one_request() -> None:
        kind = rng.choices(mix, weights=[e.weight for e in mix])[0]
        request_id = new_request_id()
        sent = clock()
        try:
            await client.generate(
                prompt,
                seed=rng.randrange(2**32),
                num_images=num_images,
                steps=kind.steps,
                width=kind.width,
                height=kind.height,
                request_id=request_id,
            )
            code = "OK"
        except SdxlError as error:
            code = error.code.name
        samples.append(
            Sample(
                sent - started,
                clock() - sent,
                code,
                kind.width,
                kind.height,
                kind.steps,
                num_images,
                request_id,
            )
        )

    if rate is not None:
        tasks = []
        next_arrival = started
        while True:
            next_arrival += rng.expovariate(rate)
            if next_arrival >= stop_at:
                break
            await asyncio.sleep(max(0.0, next_arrival - clock()))
            tasks.append(asyncio.create_task(one_request()))
        await asyncio.gather(*tasks)
    else:

        async def worker() -> None:
            while clock() < stop_at:
                await one_request()

        await asyncio.gather(*(worker() for _ in range(concurrency or 4)))
    return samples


def run(args: argparse.Namespace) -> int:
    if args.concurrency is not None and args.concurrency < 1:
        raise SystemExit("error: --concurrency must be >= 1")
    if args.rate is not None and args.rate <= 0:
        raise SystemExit("error: --rate must be > 0")
    mode = "open" if args.rate is not None else "closed"

    async def measure() -> list[Sample]:
        async with make_async_client(args) as client:
            return await run_load(
                client,
                mix=args.mix,
                duration=args.duration,
                concurrency=args.concurrency,
                rate=args.rate,
                num_images=args.num_images,
                prompt=args.prompt,
                seed=args.seed,
            )

    samples = asyncio.run(measure())
    summary = summarize(samples)
    load = f"rate {args.rate}/s" if mode == "open" else f"concurrency {args.concurrency or 4}"
    print(
        f"{mode} loop, {load}, {args.duration:g} s, mix {','.join(map(str, args.mix))}, target {args.target}"
    )
    print(format_summary(summary))
    if args.output is not None:
        report = {
            "config": {
                "target": args.target,
                "mode": mode,
                "concurrency": args.concurrency or 4 if mode == "closed" else None,
                "rate": args.rate,
                "duration_seconds": args.duration,
                "mix": [str(e) for e in args.mix],
                "num_images": args.num_images,
                "seed": args.seed,
            },
            "summary": summary,
            "samples": samples_as_dicts(samples),
        }
        args.output.write_text(json.dumps(report, indent=2))
        print(f"report       {args.output}")
    if args.plot is not None:
        from sdxl_client.cli._loadplot import write_plot

        write_plot(samples, args.plot, f"sdxl loadtest: {mode} loop, {load}")
        print(f"plot         {args.plot}")
    return 0
