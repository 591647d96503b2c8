"""What each PNG zlib level costs: encode time and bytes at 1024x1024 and at the test sizes, our writer
(engine/png_writer.py, the server's) beside Pillow's PNG encoder, and whether encoding runs in parallel.

The content is a photograph (matplotlib's sample portrait, resized with Lanczos to each size), the kind of
image a diffusion model produces: noise would not compress at any level, a flat test pattern compresses
at every level. Times are the median of repeated encodes of one image. The parallel check encodes the
same images on 1 thread and on 2 threads: a ratio near 2 means the encoder does not hold the GIL.

Prints a table and writes bench/results/png_levels.json.

    .venv/bin/python bench/png_levels.py [--sizes 64,128,256,1024] [--repeats 9]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from sdxl_server.engine.png_writer import encode_png

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "png_levels.json"


def photograph(size: int) -> np.ndarray:
    import matplotlib.cbook

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        image = Image.open(f).convert("RGB")
    side = min(image.size)
    square = image.crop((0, 0, side, side)).resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(square).copy()


def pillow_png(pixels: np.ndarray, level: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buffer, format="PNG", compress_level=level)
    return buffer.getvalue()


def median_seconds(encode, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        encode()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def parallel_speedup(encode, images: list[np.ndarray]) -> float:
    """Seconds to encode `images` on one thread over seconds on two (2.0: fully parallel)."""
    began = time.perf_counter()
    for image in images:
        encode(image)
    serial = time.perf_counter() - began
    with ThreadPoolExecutor(2) as pool:
        began = time.perf_counter()
        list(pool.map(encode, images))
        parallel = time.perf_counter() - began
    return serial / parallel


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="64,128,256,1024")
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    for size in sizes:
        pixels = photograph(size)
        repeats = args.repeats if size <= 256 else max(3, args.repeats // 3)
        for level in range(10):
            ours = encode_png(pixels, level)
            theirs = pillow_png(pixels, level)
            rows.append(
                {
                    "size": size,
                    "level": level,
                    "ours_ms": 1000 * median_seconds(lambda p=pixels, lv=level: encode_png(p, lv), repeats),
                    "ours_bytes": len(ours),
                    "pillow_ms": 1000 * median_seconds(lambda p=pixels, lv=level: pillow_png(p, lv), repeats),
                    "pillow_bytes": len(theirs),
                    "raw_bytes": pixels.nbytes,
                }
            )
    big = [photograph(max(sizes))] * 8
    speedup = {
        "ours_level_1": parallel_speedup(lambda p: encode_png(p, 1), big),
        "pillow_level_1": parallel_speedup(lambda p: pillow_png(p, 1), big),
    }
    result = {
        "rows": rows,
        "parallel_speedup_2_threads": speedup,
        "load_average": os.getloadavg(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"{'size':>6}{'level':>6}{'ours ms':>10}{'ours KiB':>10}"
        f"{'Pillow ms':>11}{'Pillow KiB':>12}{'raw KiB':>9}"
    )
    for r in rows:
        print(
            f"{r['size']:>6}{r['level']:>6}{r['ours_ms']:>10.2f}{r['ours_bytes'] / 1024:>10.1f}"
            f"{r['pillow_ms']:>11.2f}{r['pillow_bytes'] / 1024:>12.1f}{r['raw_bytes'] / 1024:>9.0f}"
        )
    print(
        f"2 threads / 1 thread at {max(sizes)}x{max(sizes)}, level 1: ours {speedup['ours_level_1']:.2f}x, "
        f"Pillow {speedup['pillow_level_1']:.2f}x (load average {result['load_average'][0]:.1f})"
    )
    print(f"wrote {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
