"""`sdxl loadtest`: drive a server with many requests and report throughput and latency.

Two ways to offer load. Closed loop (``--concurrency N``): N workers each send their next request as soon
as the previous one is answered, so the offered load adapts to the server (measures capacity). Open loop
(``--rate R``): requests arrive as a Poisson process at R per second regardless of answers, the way
independent users arrive (measures latency under a given load, and shows overload: queues grow and the
server rejects with RESOURCE_EXHAUSTED). Each request draws its size and steps from ``--mix``.
Retries are off by default so that every rejection is counted.

The mix is checked against the server's GetServerInfo before anything is sent (a size it does not serve
would only measure how fast it says INVALID_ARGUMENT). The exit status is 1 when the share of failed
requests exceeds ``--max-error-rate`` (default 0: any error fails), so that CI can gate on a run.
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
from sdxl_client._types import Resolution, ServerInfo
from sdxl_client.aio import AsyncClient
from sdxl_client.cli._connection import make_async_client, wait_while_warming_up_async
from sdxl_client.cli._loadstats import Sample, format_summary, samples_as_dicts, summarize
from sdxl_client.cli._messages import UsageError
from sdxl_client.cli._terminal import StatusLine, format_duration

# Seconds between progress lines when stderr is not a terminal (a CI log), and between redraws when it is.
_LOG_PROGRESS_SECONDS = 10.0
_TERMINAL_PROGRESS_SECONDS = 0.5
_INFO_TIMEOUT_SECONDS = 30.0


@dataclass(frozen=True)
class MixEntry:
    """One kind of request in the mix, drawn with probability proportional to ``weight``."""

    width: int
    height: int
    steps: int
    weight: float

    def __str__(self) -> str:
        size = f"{self.width}x{self.height}" if self.width or self.height else "default"
        return f"{size}:{self.steps}:{self.weight:g}"


def describe_mix(mix: list[MixEntry], info: ServerInfo) -> str:
    """The mix as sent, the server's defaults filled in: ``64x64, 10 steps``, or with weights
    ``64x64, 4 steps (x3); 96x64, 8 steps (x1)``."""
    parts = []
    for entry in mix:
        size = f"{entry.width}x{entry.height}" if entry.width or entry.height else f"{info.resolutions[0]}"
        steps = entry.steps or info.default_steps
        weight = f" (x{entry.weight:g})" if len(mix) > 1 else ""
        parts.append(f"{size}, {steps} steps{weight}")
    return "; ".join(parts)


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


def mix_problems(mix: list[MixEntry], num_images: int, info: ServerInfo) -> list[str]:
    """Why entries of the mix would be refused by the server ``info`` describes (empty: none)."""
    problems = []
    served = ", ".join(map(str, info.resolutions))
    for entry in mix:
        size = Resolution(entry.width, entry.height)
        if (entry.width or entry.height) and size not in info.resolutions:
            problems.append(f"{entry}: {size} is not served (served: {served})")
        if entry.steps and not info.min_steps <= entry.steps <= info.max_steps:
            problems.append(f"{entry}: {entry.steps} steps is outside {info.min_steps}..{info.max_steps}")
    if not 1 <= num_images <= info.max_images_per_request:
        problems.append(f"--num-images {num_images} is outside 1..{info.max_images_per_request}")
    return problems


def _error_rate(text: str) -> float:
    try:
        value = float(text.rstrip("%")) / (100 if text.endswith("%") else 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a fraction like 0.05 or 5%, got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be within 0..1 (or 0%..100%), got {text!r}")
    return value


@dataclass
class LoadCounters:
    """What a running load test has done so far, for its progress line."""

    sent: int = 0
    answered: int = 0
    errors: int = 0

    @property
    def in_flight(self) -> int:
        return self.sent - self.answered


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
        "--prompt",
        # Drawable by the demo model too (`make run`), so that its log names no unknown words; the
        # prompt does not change a request's cost.
        default="a yellow circle on a purple background",
        help="prompt of every request (default %(default)r)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the mix and arrival draws (and of the images)"
    )
    parser.add_argument("--output", type=pathlib.Path, default=None, help="write the JSON report here")
    parser.add_argument(
        "--plot", type=pathlib.Path, default=None, help="write a PNG plot here (needs matplotlib)"
    )
    parser.add_argument(
        "--max-error-rate",
        type=_error_rate,
        default=0.0,
        metavar="RATE",
        help="exit 1 when more than this share of requests fail, e.g. 0.05 or 5%% (default 0: any error)",
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show progress on stderr while running (default: a redrawn line on a terminal, "
        f"a line every {_LOG_PROGRESS_SECONDS:g} s otherwise)",
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
    counters: LoadCounters | None = None,
) -> list[Sample]:
    """Sends requests for ``duration`` seconds (closed loop, or open loop when ``rate`` is given) and
    waits for every answer.

    Returns:
        One sample per request sent, in order of completion.
    """
    rng = random.Random(seed)
    samples: list[Sample] = []
    counts = counters if counters is not None else LoadCounters()
    started = clock()
    stop_at = started + duration

    async def one_request() -> None:
        kind = rng.choices(mix, weights=[e.weight for e in mix])[0]
        request_id = new_request_id()
        sent = clock()
        counts.sent += 1
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
            counts.errors += 1
        counts.answered += 1
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


async def _show_progress(
    line: StatusLine, counters: LoadCounters, duration: float, clock: Callable[[], float] = time.monotonic
) -> None:
    """Redraws (terminal) or prints (log) the progress of a running load test until cancelled."""
    started = clock()
    interval = _TERMINAL_PROGRESS_SECONDS if line.enabled else _LOG_PROGRESS_SECONDS
    first = True
    while True:
        elapsed = clock() - started
        text = (
            f"{format_duration(min(elapsed, duration))} of {format_duration(duration)}: "
            f"sent {counters.sent}, ok {counters.answered - counters.errors}, errors {counters.errors}, "
            f"in flight {counters.in_flight}"
        )
        if line.enabled:
            line.show(text)
        elif not first:  # a log gets a line per interval, not one at the start
            line.note(text)
        first = False
        await asyncio.sleep(interval)


def run(args: argparse.Namespace) -> int:
    if args.concurrency is not None and args.concurrency < 1:
        raise UsageError("--concurrency must be >= 1")
    if args.rate is not None and args.rate <= 0:
        raise UsageError("--rate must be > 0")
    mode = "open" if args.rate is not None else "closed"
    line = StatusLine(enabled=None if args.progress is None else args.progress)
    periodic = args.progress is not False

    async def measure() -> tuple[list[Sample], ServerInfo]:
        async with make_async_client(args, line) as client:
            await wait_while_warming_up_async(client, args)
            # The check is not part of the measured load: it gets time even when --timeout is tiny.
            info = await client.server_info(timeout=max(args.timeout, _INFO_TIMEOUT_SECONDS))
            problems = mix_problems(args.mix, args.num_images, info)
            if problems:
                raise UsageError(f"--mix does not fit the server at {client.target}: " + "; ".join(problems))
            counters = LoadCounters()
            progress = (
                asyncio.create_task(_show_progress(line, counters, args.duration)) if periodic else None
            )
            try:
                samples = await run_load(
                    client,
                    mix=args.mix,
                    duration=args.duration,
                    concurrency=args.concurrency,
                    rate=args.rate,
                    num_images=args.num_images,
                    prompt=args.prompt,
                    seed=args.seed,
                    counters=counters,
                )
                return samples, info
            finally:
                if progress is not None:
                    progress.cancel()
                line.clear()

    samples, info = asyncio.run(measure())
    summary = summarize(samples)
    load = f"rate {args.rate}/s" if mode == "open" else f"concurrency {args.concurrency or 4}"
    print(
        f"{mode} loop, {load}, {args.duration:g} s, mix {describe_mix(args.mix, info)}, target {args.target}"
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
    return _verdict(summary, args.max_error_rate)


def _verdict(summary: dict[str, object], max_error_rate: float) -> int:
    """Prints the error rate against the limit; 1 when it is exceeded or nothing was answered."""
    requests, ok = int(str(summary["requests"])), int(str(summary["ok"]))
    if requests == 0:
        print("FAILED       no request was answered")
        return 1
    rate = (requests - ok) / requests
    verdict = "FAILED" if rate > max_error_rate else "passed"
    print(f"{verdict:<13}error rate {rate:.1%} (--max-error-rate {max_error_rate:.1%})")
    return 1 if rate > max_error_rate else 0
