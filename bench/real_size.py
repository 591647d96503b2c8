"""SDXL 1.0 base's real architecture with random weights: what serving it costs here (not run in CI).

Builds the model once with `sdxl-server build-random-model --arch sdxl-base` (random bfloat16 weights,
about 7 GB on disk), then starts the engine on it at a small resolution (CPU) and reports time to ready,
the device seconds of one guided step and of one decode (each program's second run in warm-up, then the
device clock's figures over a real request), and the peak resident memory. On an accelerator the same
script takes --resolution 1024x1024 --dtype bfloat16; bench/real_size_accelerator.py adds throughput by
slot count, MFU and the seed's recipe on the same chip.

    .venv/bin/python bench/real_size.py [--resolution 256x256] [--steps 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
from bench.paths import CACHE_ROOT  # noqa: E402

MODEL_DIR = CACHE_ROOT / "sdxl-base-random"
RESULTS = REPO / "bench" / "results" / "real_size.json"


def ensure_random_sdxl_base() -> Path:
    """SDXL 1.0 base's architecture with random weights in MODEL_DIR, built on first use."""
    if not (MODEL_DIR / ".random-model-complete").exists():
        began = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "sdxl_server.main",
                "build-random-model",
                "--arch",
                "sdxl-base",
                str(MODEL_DIR),
            ],
            check=True,
        )
        print(f"built {MODEL_DIR} in {time.perf_counter() - began:.0f}s")
    return MODEL_DIR


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--resolution", default="256x256")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()

    ensure_random_sdxl_base()
    from sdxl_server.engine import EngineConfig, JaxEngine
    from sdxl_server.engine.api import Finished, GenerationRequest, Resolution

    resolution = Resolution.parse(args.resolution)
    began = time.perf_counter()
    engine = JaxEngine(
        EngineConfig(
            model=str(MODEL_DIR),
            resolutions=(resolution,),
            slots_per_device=1,
            max_steps=max(args.steps, 4),
            default_steps=args.steps,
            dtype=args.dtype,
            max_devices=1,
        )
    )
    engine.start()
    ready_seconds = time.perf_counter() - began
    warm = engine.stats()
    done = threading.Event()
    events: list[object] = []

    def listener(event: object) -> None:
        events.append(event)
        if isinstance(event, Finished) or type(event).__name__ == "Failed":
            done.set()

    submitted = time.perf_counter()
    engine.submit(
        GenerationRequest(
            request_id="real-size",
            prompt="a photograph of an astronaut riding a horse",
            negative_prompt="",
            seed=0,
            num_images=1,
            steps=args.steps,
            guidance_scale=5.0,
            resolution=resolution,
        ),
        listener,
    )
    done.wait()
    request_seconds = time.perf_counter() - submitted
    after = engine.stats()
    engine.stop()
    result = {
        "model": "sdxl-base architecture, random weights (build-random-model)",
        "resolution": str(resolution),
        "dtype": engine.info().dtype,
        "ready_seconds": ready_seconds,
        "startup_phases": engine.startup_phases,
        "warm_up_step_seconds": warm.step_seconds_ewma,
        "warm_up_decode_seconds": warm.decode_seconds_ewma,
        "step_seconds": after.step_seconds_ewma,
        "decode_seconds": after.decode_seconds_ewma,
        "request_seconds": request_seconds,
        "steps": args.steps,
        "finished": isinstance(events[-1], Finished),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }
    print(json.dumps(result, indent=2))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
