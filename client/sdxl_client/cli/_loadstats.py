"""Load test samples and their summary: throughput, latency percentiles, errors by status code.

Percentiles interpolate linearly between the two nearest ranks (numpy's default ``linear`` method), so a
report's numbers can be recomputed from the raw samples it writes.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class Sample:
    """One request of a load test.

    Attributes:
        start: Seconds from the start of the test to sending the request.
        latency: Seconds from sending to the answer (success or error).
        code: gRPC status code name, ``OK`` on success.
        width: Requested width (0: server default).
        height: Requested height.
        steps: Requested steps (0: server default).
        images: Images requested.
        request_id: The request's identifier.
    """

    start: float
    latency: float
    code: str
    width: int
    height: int
    steps: int
    images: int
    request_id: str

    @property
    def end(self) -> float:
        return self.start + self.latency


def percentile(values: list[float], p: float) -> float:
    """The p-th percentile (0..100) of values, interpolating linearly between ranks; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = p / 100 * (len(ordered) - 1)
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(samples: list[Sample]) -> dict[str, Any]:
    """Throughput over the test's wall time and latency of the successful requests.

    Returns:
        ``requests``, ``ok``, ``errors_by_code``, ``elapsed_seconds`` (start to last answer),
        ``throughput_rps`` and ``images_per_second`` (successes only), ``latency_seconds`` with
        ``p50``/``p90``/``p99``/``mean``/``min``/``max`` over successes.
    """
    ok = [s for s in samples if s.code == "OK"]
    latencies = [s.latency for s in ok]
    elapsed = max((s.end for s in samples), default=0.0)
    latency: dict[str, float | None] = {f"p{p}": _finite(percentile(latencies, p)) for p in PERCENTILES}
    latency.update(
        mean=sum(latencies) / len(latencies) if latencies else None,
        min=min(latencies, default=None),
        max=max(latencies, default=None),
    )
    return {
        "requests": len(samples),
        "ok": len(ok),
        "errors_by_code": dict(Counter(s.code for s in samples if s.code != "OK")),
        "elapsed_seconds": elapsed,
        "throughput_rps": len(ok) / elapsed if elapsed > 0 else 0.0,
        "images_per_second": sum(s.images for s in ok) / elapsed if elapsed > 0 else 0.0,
        "latency_seconds": latency,
    }


def _finite(value: float) -> float | None:
    return None if math.isnan(value) else value


def format_summary(summary: dict[str, Any]) -> str:
    """A few human-readable lines for the terminal."""
    latency = summary["latency_seconds"]

    def seconds(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f} s"

    lines = [
        f"requests     {summary['requests']} ({summary['ok']} ok) in {summary['elapsed_seconds']:.2f} s",
        f"throughput   {summary['throughput_rps']:.2f} req/s, {summary['images_per_second']:.2f} images/s",
        "latency      " + ", ".join(f"p{p} {seconds(latency[f'p{p}'])}" for p in PERCENTILES),
        f"             mean {seconds(latency['mean'])}, min {seconds(latency['min'])}, "
        f"max {seconds(latency['max'])}",
    ]
    errors = summary["errors_by_code"]
    lines.append(
        "errors       " + (", ".join(f"{code} {count}" for code, count in sorted(errors.items())) or "none")
    )
    return "\n".join(lines)


def samples_as_dicts(samples: list[Sample]) -> list[dict[str, Any]]:
    return [asdict(s) for s in samples]
