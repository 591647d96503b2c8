"""docs/PERFORMANCE.md's "TPU v5e, compiled ahead of time" tables from `sdxl-server compile --json` files.

    python bench/aot_figures.py bench/results/aot/*.json

Each JSON is one run of `sdxl-server compile` (often partial: `--programs` selects the step and the decode
that are largest for its slots per device). Prints two Markdown tables: every program (HBM, FLOPs, bytes,
roofline, and the roofline per guided image-step against the seed's measured 116 ms), and per run the
memory per chip at the worst moment (parameters, slot banks, the largest program's temporaries and
outputs) against the chip's 16 GiB.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

GIB = 1024**3
# The seed's v5e-4: 4 images of 20 steps and a decode in 2.33 s, one image per chip: 116 ms per image-step.
SEED_MS_PER_IMAGE_STEP = 116.0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("reports", nargs="+", type=Path)
    runs = [json.loads(path.read_text()) for path in parser.parse_args().reports]

    print(
        "| topology | slots/chip | attention | program | HBM GiB | arguments GiB | temporaries GiB | TFLOP "
        "| GB accessed | roofline ms | ms per guided image-step | seed's 116 ms / this |"
    )
    print("| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for run in runs:
        for program in run["programs"] + run.get("seed_programs", []):
            per_step = program.get("per_image_step_seconds")
            attention = "seed (xla)" if program["name"].startswith("seed-") else run["attention"]
            per_step_ms = f"{per_step * 1e3:.1f}" if per_step else ""
            speedup = f"{SEED_MS_PER_IMAGE_STEP / (per_step * 1e3):.2f}x" if per_step else ""
            print(
                f"| {run['topology']} | {run['slots_per_device']} | {attention} | {program['name']} "
                f"| {program['hbm_bytes'] / GIB:.2f} | {program['argument_bytes'] / GIB:.2f} "
                f"| {program['temp_bytes'] / GIB:.2f} | {program['flops'] / 1e12:.2f} "
                f"| {program['bytes_accessed'] / 1e9:.1f} | {program['roofline_seconds'] * 1e3:.1f} "
                f"| {per_step_ms} | {speedup} |"
            )
    print()
    print("| topology | slots/chip | attention | resident GiB | worst moment GiB | of 16 GiB | fits |")
    print("| --- | ---: | --- | ---: | ---: | ---: | --- |")
    for run in runs:
        if not run["programs"]:
            continue
        share = run["total_hbm_bytes"] / run["device_hbm_bytes"]
        print(
            f"| {run['topology']} | {run['slots_per_device']} | {run['attention']} "
            f"| {run['resident_bytes'] / GIB:.2f} | {run['total_hbm_bytes'] / GIB:.2f} | {share:.0%} "
            f"| {'yes' if run['fits'] else 'no'} |"
        )


if __name__ == "__main__":
    main()
