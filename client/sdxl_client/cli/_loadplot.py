"""PNG plot of a load test: latency of every request and throughput, over the test's time."""

from __future__ import annotations

import math
import pathlib

from sdxl_client.cli._loadstats import Sample


def write_plot(samples: list[Sample], path: pathlib.Path, title: str) -> None:
    """Draws latency (per request, by completion time) and throughput (answers per second) to a PNG.

    Raises:
        ImportError: matplotlib is not installed (``pip install 'sdxl-client[plot]'``).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; never needs a display
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("--plot needs matplotlib: pip install 'sdxl-client[plot]'") from error

    elapsed = max((s.end for s in samples), default=1.0)
    bin_seconds = max(0.25, elapsed / 30)
    bins = max(1, math.ceil(elapsed / bin_seconds))
    ok_counts = [0] * bins
    error_counts = [0] * bins
    for sample in samples:
        index = min(bins - 1, int(sample.end / bin_seconds))
        (ok_counts if sample.code == "OK" else error_counts)[index] += 1
    bin_starts = [i * bin_seconds for i in range(bins)]

    figure, (latency_axes, throughput_axes) = plt.subplots(2, 1, sharex=True, figsize=(9, 6))
    ok = [s for s in samples if s.code == "OK"]
    failed = [s for s in samples if s.code != "OK"]
    latency_axes.scatter([s.end for s in ok], [s.latency for s in ok], s=8, label="ok")
    if failed:
        latency_axes.scatter(
            [s.end for s in failed], [s.latency for s in failed], s=8, c="red", label="error"
        )
    latency_axes.set_ylabel("latency (s), at completion")
    latency_axes.legend(loc="upper left")
    latency_axes.set_title(title)
    throughput_axes.step(bin_starts, [c / bin_seconds for c in ok_counts], where="post", label="ok")
    if failed:
        throughput_axes.step(
            bin_starts, [c / bin_seconds for c in error_counts], where="post", c="red", label="errors"
        )
    throughput_axes.set_ylabel("answers / s")
    throughput_axes.set_xlabel("time since start (s)")
    throughput_axes.legend(loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
